# Source this file (bash) to use mixclf_ros on a machine set up by `make setup`:
#   source env.sh
# It activates .venv (Python 3.11 with ROS 2 Kilted wheels) and the colcon install/ space.
# On a robot with ROS 2 from apt, source /opt/ros/<distro>/setup.bash and your workspace instead,
# and set the DDS variables below yourself (see README, "Large images and Fast DDS").
_mixclf_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ ! -x "$_mixclf_root/.venv/bin/python" ]; then
  echo "mixclf_ros: .venv missing; run 'make setup' first" >&2
  return 1 2>/dev/null || exit 1
fi
# shellcheck disable=SC1091
VIRTUAL_ENV_DISABLE_PROMPT=1 source "$_mixclf_root/.venv/bin/activate"

# The wheels install ROS 2 into the venv prefix; CMake/ament find packages there.
export AMENT_PREFIX_PATH="$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$VIRTUAL_ENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
_mixclf_ros_libs=$(ls -d "$VIRTUAL_ENV"/lib/python3.11/site-packages/ros_*.libs 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="$VIRTUAL_ENV/lib:${_mixclf_ros_libs}${LD_LIBRARY_PATH:-}"

export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
# Discovery stays on this host.
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
# Camera frames between processes: Fast DDS's default shared-memory segment (512 KB) holds not even
# one 640x480 rgb8 frame (900 KB), so best-effort frames are lost under load (ros2/rmw_fastrtps#739).
# config/fastdds_camera.xml gives shared memory a 32 MiB segment (`make bench`, section transport:
# best effort at 30 Hz on a loaded machine, 5 % lost with it against about 60 % with the defaults or
# LARGE_DATA). Fast DDS 3.x reads FASTDDS_DEFAULT_PROFILES_FILE. The profile replaces the builtin
# transports, so FASTDDS_BUILTIN_TRANSPORTS applies only where no profile is set.
export FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$_mixclf_root/config/fastdds_camera.xml}"
export FASTDDS_BUILTIN_TRANSPORTS="${FASTDDS_BUILTIN_TRANSPORTS:-LARGE_DATA}"
# torch threads: the node measures them at warm-up (torch_threads 0); MIXCLF_TORCH_THREADS=N fixes
# the parameter's default at N.

# `mixclf-eval`: the evaluation CLI of this checkout (bin/).
case ":$PATH:" in *":$_mixclf_root/bin:"*) ;; *) export PATH="$_mixclf_root/bin:$PATH" ;; esac

if [ "${1:-}" != "--no-install" ] && [ -f "$_mixclf_root/install/setup.bash" ]; then
  # shellcheck disable=SC1091
  source "$_mixclf_root/install/setup.bash"
fi
unset _mixclf_root _mixclf_ros_libs
