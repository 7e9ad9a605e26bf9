# Locates LibTorch. An explicit CMAKE_PREFIX_PATH / Torch_DIR wins; otherwise the torch wheel in the
# project venv (.venv, made by scripts/setup.sh) or the python3 on PATH tells where it lies.
if(NOT Torch_DIR AND NOT DEFINED ENV{Torch_DIR})
  find_package(Torch QUIET CONFIG)
  if(NOT Torch_FOUND)
    set(_gbmoe_pythons "${PROJECT_SOURCE_DIR}/.venv/bin/python" python3)
    foreach(_py IN LISTS _gbmoe_pythons)
      execute_process(COMMAND ${_py} -c "import torch; print(torch.utils.cmake_prefix_path)"
        OUTPUT_VARIABLE _gbmoe_torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE
        RESULT_VARIABLE _gbmoe_rc ERROR_QUIET)
      if(_gbmoe_rc EQUAL 0 AND _gbmoe_torch_prefix)
        list(APPEND CMAKE_PREFIX_PATH "${_gbmoe_torch_prefix}")
        break()
      endif()
    endforeach()
  endif()
endif()
find_package(Torch REQUIRED CONFIG)
if(Torch_VERSION VERSION_LESS 2.1)
  message(FATAL_ERROR "gbmoe needs LibTorch >= 2.1, found ${Torch_VERSION} in ${Torch_DIR}")
endif()
message(STATUS "gbmoe: LibTorch ${Torch_VERSION} from ${Torch_DIR}")
