# Runs PROGRAM under `MPIEXEC NP_FLAG 2` and fails unless the job exits non-zero within
# TIMEOUT_S seconds and prints "[rank 1] error:".
string(TIMESTAMP start "%s")
execute_process(COMMAND ${MPIEXEC} ${NP_FLAG} 2 ${PROGRAM}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT ${TIMEOUT_S})
string(TIMESTAMP end "%s")
math(EXPR elapsed "${end} - ${start}")
message(STATUS "mpirun exit: ${rc} after ${elapsed} s\n--- stdout\n${out}--- stderr\n${err}")
if(NOT rc MATCHES "^[0-9]+$")
  message(FATAL_ERROR "the job did not end by itself within ${TIMEOUT_S} s (${rc}): a rank hung")
endif()
if(rc EQUAL 0)
  message(FATAL_ERROR "mpirun exited 0 although rank 1 threw")
endif()
if(NOT "${out}${err}" MATCHES "\\[rank 1\\] error: deliberate failure on rank 1")
  message(FATAL_ERROR "the output lacks \"[rank 1] error: deliberate failure on rank 1\"")
endif()
