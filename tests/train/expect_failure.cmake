# Runs EXE with ARGS ("|"-separated) and passes only if it exits non-zero and its output
# matches the regular expression EXPECT.
string(REPLACE "|" ";" args "${ARGS}")
execute_process(COMMAND ${EXE} ${args} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0)
  message(FATAL_ERROR "expected a non-zero exit from ${EXE} ${args}; output:\n${out}${err}")
endif()
if(NOT "${out}${err}" MATCHES "${EXPECT}")
  message(FATAL_ERROR "output of ${EXE} ${args} lacks /${EXPECT}/:\n${out}${err}")
endif()
message(STATUS "exit ${rc}: ${err}")
