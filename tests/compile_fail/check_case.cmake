# Compiles one compile-fail case: cmake -DCOMPILER=... -DSOURCE=<case>.cpp -DFLAGS_FILE=...
# -DMODE=compiles|fails -P check_case.cmake (see CMakeLists.txt here).
#   compiles: the case must compile without INFUSE_COMPILE_FAIL;
#   fails:    with it the compiler must fail, and its output must match the regex on the case's
#             first line, `// expect: <regex>` (a CMake regular expression).
foreach(variable IN ITEMS COMPILER SOURCE FLAGS_FILE MODE)
  if(NOT DEFINED ${variable})
    message(FATAL_ERROR "check_case.cmake: -D${variable}=... is missing")
  endif()
endforeach()
include(${FLAGS_FILE})

file(STRINGS ${SOURCE} first_line LIMIT_COUNT 1)
if(NOT first_line MATCHES "^// expect: (.+)$")
  message(FATAL_ERROR "${SOURCE}: the first line must be `// expect: <regex>`, not `${first_line}`")
endif()
set(expected "${CMAKE_MATCH_1}")

if(MODE STREQUAL "fails")
  list(APPEND compile_flags -DINFUSE_COMPILE_FAIL)
elseif(NOT MODE STREQUAL "compiles")
  message(FATAL_ERROR "check_case.cmake: MODE is `${MODE}`, expected `compiles` or `fails`")
endif()

execute_process(COMMAND ${COMPILER} ${compile_flags} ${SOURCE}
                RESULT_VARIABLE status OUTPUT_VARIABLE output ERROR_VARIABLE output)
string(JOIN " " command ${COMPILER} ${compile_flags} ${SOURCE})

if(MODE STREQUAL "compiles")
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "${SOURCE} must compile without INFUSE_COMPILE_FAIL, but did not:\n"
                        "${command}\n${output}")
  endif()
  message(STATUS "compiles without INFUSE_COMPILE_FAIL, as it must")
else()
  if(status EQUAL 0)
    message(FATAL_ERROR "${SOURCE} compiled with INFUSE_COMPILE_FAIL; it must fail with\n"
                        "  ${expected}\n${command}")
  endif()
  if(NOT output MATCHES "${expected}")
    message(FATAL_ERROR "${SOURCE} failed to compile, but without the expected message\n"
                        "  ${expected}\n${command}\n${output}")
  endif()
  message(STATUS "fails with the expected message: ${expected}")
endif()
