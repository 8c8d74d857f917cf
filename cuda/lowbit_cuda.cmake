# The CUDA extension lowbit._cuda, built when a CUDA toolkit is found.
#   LOWBIT_CUDA=AUTO (default): build it if nvcc is found, and say which way it went.
#   LOWBIT_CUDA=ON : a missing toolkit is a configure error.   LOWBIT_CUDA=OFF: never.
# Targets sm_80, sm_89 and sm_90a (+ compute_80 PTX); cudart is linked statically, so importing lowbit never needs
# a driver: the module only touches the driver when a CUDA array reaches it.
set(LOWBIT_CUDA "AUTO" CACHE STRING "Build the CUDA extension: AUTO, ON or OFF")
string(TOUPPER "${LOWBIT_CUDA}" LOWBIT_CUDA)
if(NOT LOWBIT_CUDA MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "LOWBIT_CUDA must be AUTO, ON or OFF (got '${LOWBIT_CUDA}')")
endif()

set(LOWBIT_BUILD_CUDA OFF)
if(NOT LOWBIT_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  if(NOT CMAKE_CUDA_COMPILER)
    find_program(LOWBIT_NVCC nvcc HINTS ENV CUDA_HOME ENV CUDA_PATH PATH_SUFFIXES bin
                 PATHS /usr/local/cuda/bin)
    if(LOWBIT_NVCC)
      set(CMAKE_CUDA_COMPILER "${LOWBIT_NVCC}")
    endif()
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(LOWBIT_BUILD_CUDA ON)
  elseif(LOWBIT_CUDA STREQUAL "ON")
    message(FATAL_ERROR "LOWBIT_CUDA=ON but no CUDA compiler (nvcc) was found; "
                        "set CUDACXX or CUDA_HOME, or use LOWBIT_CUDA=AUTO/OFF")
  endif()
endif()

if(NOT LOWBIT_BUILD_CUDA)
  message(STATUS "lowbit: CUDA extension OFF (LOWBIT_CUDA=${LOWBIT_CUDA}, no toolkit used)")
  return()
endif()

enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
# Real code for each target GPU, plus compute_80 PTX so newer GPUs (sm_100, sm_120) can JIT the
# kernels. (compute_90a PTX would be useless there: arch-specific PTX only runs on sm_90a itself.)
# LOWBIT_CUDA_ARCHS (env or -D) narrows this, e.g. "90a-real" for a quicker build on an H100.
set(LOWBIT_CUDA_ARCHS "" CACHE STRING "CUDA architectures (empty: 80-real;89-real;90a-real;80-virtual)")
if(NOT LOWBIT_CUDA_ARCHS)
  set(LOWBIT_CUDA_ARCHS "80-real;89-real;90a-real;80-virtual")
endif()
message(STATUS "lowbit: CUDA extension ON (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, ${LOWBIT_CUDA_ARCHS})")
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)

file(GLOB LOWBIT_CUDA_SRC CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/*.cu)
# format.cpp holds the NF4 tables: one definition shared with the CPU kernels.
pybind11_add_module(_cuda MODULE ${CMAKE_CURRENT_SOURCE_DIR}/python/bindings/cuda_module.cpp
                    ${CMAKE_CURRENT_SOURCE_DIR}/python/bindings/dlpack_view.cpp
                    ${CMAKE_CURRENT_SOURCE_DIR}/cpp/common/format.cpp ${LOWBIT_CUDA_SRC})
target_include_directories(_cuda PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/cpp ${CMAKE_CURRENT_LIST_DIR}
                           ${CMAKE_CURRENT_SOURCE_DIR}/python/bindings)
set_target_properties(_cuda PROPERTIES CUDA_ARCHITECTURES "${LOWBIT_CUDA_ARCHS}"
                                       CUDA_RUNTIME_LIBRARY Static)
target_compile_options(_cuda PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-O2 -Wall -Wextra -Wno-unused-parameter>
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -lineinfo -Xcompiler=-Wall,-Wextra,-Wno-unused-parameter>)
# Bit-exact with the CPU reference: no FMA contraction, IEEE division, denormals kept.
set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/quantize.cu PROPERTIES
                            COMPILE_OPTIONS "--fmad=false;-prec-div=true;-prec-sqrt=true;-ftz=false")
string(REPLACE ";" " " LOWBIT_CUDA_ARCHS_TEXT "${LOWBIT_CUDA_ARCHS}")
set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/runtime_info.cu PROPERTIES
                            COMPILE_DEFINITIONS "LOWBIT_CUDA_ARCH_TARGETS=\"${LOWBIT_CUDA_ARCHS_TEXT}\"")
target_link_libraries(_cuda PRIVATE CUDA::cudart_static)
install(TARGETS _cuda DESTINATION lowbit)
