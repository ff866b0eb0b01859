# Builds and runs tests/package/consumer.cpp through one of the routes a user takes to infuse:
#   cmake -D METHOD=<install|find_package|add_subdirectory|meson|pkg_config>
#         -D SOURCE_DIR=<infuse source tree> -D WORK_DIR=<folder in the build tree>
#         -D VERSION=<infuse version> -D CXX=<C++ compiler> -D NINJA=<ninja>
#         [-D MESON=<meson>] [-D PKG_CONFIG=<pkg-config>] -P consumer_test.cmake
# `install` installs infuse alone under WORK_DIR/install/prefix, which find_package and pkg_config
# use. Each method starts from a fresh WORK_DIR/<method>, prints every command with its output,
# and writes nothing outside WORK_DIR. A missing tool prints "infuse package test skipped: ...",
# which tests/package/CMakeLists.txt declares as a skip.
cmake_minimum_required(VERSION 3.25)

set(package_dir ${CMAKE_CURRENT_LIST_DIR})
set(prefix ${WORK_DIR}/install/prefix)
set(method_dir ${WORK_DIR}/${METHOD})

# A macro, so that its return() leaves the calling test.
macro(skip_unless_found tool path)
  if("${path}" MATCHES "^$|NOTFOUND$")
    message("infuse package test skipped: ${tool} was not found")
    return()
  endif()
endmacro()

# Runs a command, showing it and its output; stops the test if it fails, unless MAY_FAIL is given.
# Leaves the exit status in `command_status` and the combined output in `command_output`.
function(run)
  cmake_parse_arguments(PARSE_ARGV 0 arg MAY_FAIL "" "")
  execute_process(COMMAND ${arg_UNPARSED_ARGUMENTS} COMMAND_ECHO STDOUT RESULT_VARIABLE status
    OUTPUT_VARIABLE output ERROR_VARIABLE output ECHO_OUTPUT_VARIABLE ECHO_ERROR_VARIABLE)
  if(NOT status EQUAL 0 AND NOT arg_MAY_FAIL)
    list(JOIN arg_UNPARSED_ARGUMENTS " " command)
    message(FATAL_ERROR "[${METHOD}] failed (${status}): ${command}")
  endif()
  set(command_status "${status}" PARENT_SCOPE)
  set(command_output "${output}" PARENT_SCOPE)
endfunction()

# Configures a CMake project with the compiler and generator of the enclosing build.
macro(configure source build)
  run(${CMAKE_COMMAND} -S ${source} -B ${build} -G Ninja -D CMAKE_MAKE_PROGRAM=${NINJA}
      -D CMAKE_CXX_COMPILER=${CXX} ${ARGN})
endmacro()

function(build_and_run_consumer build)
  run(${CMAKE_COMMAND} --build ${build})
  run(${build}/consumer)
endfunction()

function(test_install)
  # The install prefix given at configure time is one that is never installed to, so the test
  # proves that the installed files hold no configure-time prefix (`cmake --install --prefix`
  # moves them, as packagers do).
  configure(${SOURCE_DIR} ${method_dir}/build -D CMAKE_INSTALL_PREFIX=${method_dir}/unused-prefix
    -D INFUSE_BUILD_TESTS=OFF -D INFUSE_BUILD_BENCHMARKS=OFF -D INFUSE_BUILD_EXAMPLES=OFF
    -D INFUSE_CUDA=OFF)
  run(${CMAKE_COMMAND} --build ${method_dir}/build)
  run(${CMAKE_COMMAND} --install ${method_dir}/build --prefix ${prefix})
  if(EXISTS ${method_dir}/unused-prefix)
    message(FATAL_ERROR "[install] wrote to the configure-time prefix ${method_dir}/unused-prefix")
  endif()
endfunction()

function(test_find_package)
  configure(${package_dir}/find_package ${method_dir}/build -D CMAKE_PREFIX_PATH=${prefix})
  file(STRINGS ${method_dir}/build/CMakeCache.txt found REGEX "^infuse_DIR:")
  string(FIND "${found}" "=${prefix}/" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "[find_package] found infuse outside ${prefix}: ${found}")
  endif()
  build_and_run_consumer(${method_dir}/build)

  # SameMinorVersion: a newer minor or major version must be refused.
  foreach(wanted IN ITEMS 0.2 99)
    configure(${package_dir}/find_package ${method_dir}/want-${wanted} MAY_FAIL
      -D CMAKE_PREFIX_PATH=${prefix} -D INFUSE_WANTED_VERSION=${wanted})
    string(FIND "${command_output}" "requested version \"${wanted}\"" at)
    if(command_status EQUAL 0 OR at EQUAL -1)
      message(FATAL_ERROR "[find_package] infuse ${wanted} was not refused for its version")
    endif()
  endforeach()
endfunction()

function(test_add_subdirectory)
  configure(${package_dir}/add_subdirectory ${method_dir}/build -D INFUSE_SOURCE_DIR=${SOURCE_DIR})
  build_and_run_consumer(${method_dir}/build)
endfunction()

function(test_meson)
  skip_unless_found(meson "${MESON}")
  # Meson wants subprojects inside the consumer's own tree: copy the consumer out of the source tree
  # and link its subprojects/infuse to the infuse checkout.
  file(COPY ${package_dir}/meson/meson.build ${package_dir}/consumer.cpp
       DESTINATION ${method_dir}/source)
  file(MAKE_DIRECTORY ${method_dir}/source/subprojects)
  file(CREATE_LINK ${SOURCE_DIR} ${method_dir}/source/subprojects/infuse SYMBOLIC)
  # --force-fallback-for: an infuse.pc somewhere on the system must not stand in for the subproject.
  run(${CMAKE_COMMAND} -E env CXX=${CXX} ${MESON} setup ${method_dir}/build ${method_dir}/source
      --force-fallback-for=infuse --wrap-mode=nodownload)
  run(${NINJA} -C ${method_dir}/build)
  run(${method_dir}/build/consumer)
  # As a subproject infuse adds no targets and no tests of its own, and meson.build carries the
  # version that CMakeLists.txt does.
  run(${MESON} introspect --targets --tests --projectinfo ${method_dir}/build)
  string(JSON targets LENGTH "${command_output}" targets)
  string(JSON tests LENGTH "${command_output}" tests)
  if(NOT targets EQUAL 1 OR NOT tests EQUAL 0)
    message(FATAL_ERROR "[meson] expected the consumer as the only target and no tests, got "
                        "${targets} targets and ${tests} tests")
  endif()
  string(JSON meson_version GET "${command_output}" projectinfo subprojects 0 version)
  if(NOT meson_version STREQUAL VERSION)
    message(FATAL_ERROR "[meson] meson.build says version ${meson_version}, expected ${VERSION}")
  endif()
endfunction()

function(test_pkg_config)
  skip_unless_found(pkg-config "${PKG_CONFIG}")
  set(pkg_config ${CMAKE_COMMAND} -E env PKG_CONFIG_PATH=${prefix}/share/pkgconfig ${PKG_CONFIG})
  run(${pkg_config} --modversion infuse)
  string(STRIP "${command_output}" found_version)
  if(NOT found_version STREQUAL VERSION)
    message(FATAL_ERROR "[pkg_config] infuse.pc says version ${found_version}, expected ${VERSION}")
  endif()
  run(${pkg_config} --cflags --libs infuse)
  separate_arguments(flags UNIX_COMMAND "${command_output}")
  file(MAKE_DIRECTORY ${method_dir})
  run(${CXX} ${package_dir}/consumer.cpp ${flags} -o ${method_dir}/consumer)
  run(${method_dir}/consumer)
endfunction()

set(methods install find_package add_subdirectory meson pkg_config)
if(NOT METHOD IN_LIST methods)
  message(FATAL_ERROR "METHOD is '${METHOD}', expected one of: ${methods}")
endif()
skip_unless_found(ninja "${NINJA}")
file(REMOVE_RECURSE ${method_dir})
cmake_language(CALL test_${METHOD})
