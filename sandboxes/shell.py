"""The shell side of every backend: how one command runs so that ``cd`` and ``export`` persist.

There is no long-lived interactive shell. Each command runs in a fresh bash that first restores
the state the previous command left (working directory and exported variables, kept in
``STATE_DIR`` inside the sandbox), then ``eval``s the command, and on exit (including ``exit N``
and ``set -e`` failures) saves the state again. A command killed on timeout saves nothing, so
the next command starts from the last good state. Per-call ``cwd``/``env`` apply to that call
only: an explicit ``cwd`` does not move the saved directory, and a per-call variable is
restored afterwards unless the command itself changed it.

Two launchers use the same ``WRAPPER``:

- the **spawner** (local and docker backends): a bash loop that is the sandbox's pid 1, reads
  request ids on its stdin, and forks one job per request. The host talks to it through files
  and FIFOs in a control directory (see ``sandboxes.channel``); a fork costs ~1 ms where a
  ``docker exec`` costs ~60 ms on this machine;
- ``bash -c`` (``bash_argv``): for backends that only offer "run this argv" (docker's exec API,
  Harbor environments).

Every job exports ``APPRENTICE_EXEC=<id>`` so the host can find and kill exactly the
processes of one command, children and grandchildren included.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence

STATE_DIR = "/run/apprentice/state"
"""Where the persistent cwd/env live inside a sandbox."""
CONTROL_DIR = "/run/apprentice/ctl"
"""Where the spawner finds per-command request files and FIFOs inside a sandbox."""
EXEC_MARKER = "APPRENTICE_EXEC"
"""Exported into every command's environment with a unique id, to find its processes. A command
launched through two layers (a Harbor environment backed by our sandbox) carries both ids,
joined by ``:``."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

WRAPPER = r"""
if [[ -n $__apx_s && -r $__apx_s/env ]]; then
  ((${#__apx_unset[@]})) && unset -v "${__apx_unset[@]}" 2>/dev/null
  . "$__apx_s/env" 2>/dev/null
fi
declare -A __apx_had=() __apx_old=()
for __apx_kv in "${__apx_oneoff[@]}"; do
  __apx_k=${__apx_kv%%=*}
  if [[ $__apx_k == APPRENTICE_EXEC ]]; then  # nested launchers: carry both markers
    export "APPRENTICE_EXEC=${APPRENTICE_EXEC:+$APPRENTICE_EXEC:}${__apx_kv#*=}"; continue
  fi
  if [[ -v $__apx_k ]]; then __apx_had[$__apx_k]=1; __apx_old[$__apx_k]=${!__apx_k}; fi
  export "$__apx_kv"
done
if [[ -n $__apx_cwd ]]; then
  cd -- "$__apx_cwd" || exit 1
else
  __apx_saved=
  [[ -n $__apx_s && -r $__apx_s/cwd ]] && IFS= read -r -d '' __apx_saved < "$__apx_s/cwd"
  cd -- "${__apx_saved:-$__apx_workdir}" 2>/dev/null || cd -- "$__apx_workdir" 2>/dev/null || cd /
fi
__apx_save() {
  local __apx_rc=$? __apx_kv __apx_k
  set +eu
  for __apx_kv in "${__apx_oneoff[@]}"; do
    __apx_k=${__apx_kv%%=*}
    if [[ -v $__apx_k && ${!__apx_k} == "${__apx_kv#*=}" ]]; then
      if [[ -n ${__apx_had[$__apx_k]} ]]; then export "$__apx_k=${__apx_old[$__apx_k]}"
      else unset -v "$__apx_k"; fi
    fi
  done
  export -n APPRENTICE_EXEC 2>/dev/null
  [[ -n $__apx_s ]] || exit "$__apx_rc"
  [[ -d $__apx_s ]] || mkdir -p "$__apx_s" 2>/dev/null
  export -p > "$__apx_s/env" 2>/dev/null
  [[ -n $__apx_cwd ]] || printf '%s' "$PWD" > "$__apx_s/cwd" 2>/dev/null
  exit "$__apx_rc"
}
trap __apx_save EXIT
eval "$__apx_cmd"
"""

SPAWNER = r"""
set -m
__apx_ctl=$1 __apx_wrapper=$2
mkdir -p /run/apprentice/state 2>/dev/null
mapfile -t __apx_unset < <(compgen -e)
[[ -n $3 ]] && exec 0<"$3"
while IFS= read -r __apx_id; do
  [[ $__apx_id =~ ^[A-Za-z0-9_-]+$ ]] || continue
  __apx_d=$__apx_ctl/$__apx_id
  {
    (
      set +m
      exec 0</dev/null 1<>"$__apx_d/out" 2<>"$__apx_d/err"
      export APPRENTICE_EXEC=$__apx_id
      . "$__apx_d/req"
      eval "$__apx_wrapper"
    )
    printf '%d\n' "$?" 1<>"$__apx_d/done"
  } &
done
"""

KILL_MARKED = r"""
__apx_self=$$
for __apx_pass in 1 2 3 4 5 6 7 8; do
  __apx_hit=0
  for __apx_p in /proc/[0-9]*; do
    __apx_pid=${__apx_p#/proc/}
    [[ $__apx_pid == "$__apx_self" || $__apx_pid == 1 ]] && continue
    mapfile -d '' __apx_e < "$__apx_p/environ" 2>/dev/null || continue
    for __apx_x in "${__apx_e[@]}"; do
      if [[ $__apx_x == APPRENTICE_EXEC=* && :${__apx_x#*=}: == *":$1:"* ]]; then
        kill -STOP "$__apx_pid" 2>/dev/null; kill -KILL "$__apx_pid" 2>/dev/null
        __apx_hit=1; break
      fi
    done
  done
  ((__apx_hit)) || break
done
"""
"""Kill every process of one command from inside the sandbox (for the exec-API launcher)."""


def check_env_names(env: Mapping[str, str]) -> None:
    for name in env:
        if not _NAME.match(name):
            raise ValueError(
                f"environment variable name {name!r} is not a valid shell identifier "
                "(expected letters, digits and underscores, not starting with a digit)"
            )


def request_script(
    command: str,
    cwd: str | None,
    env: Mapping[str, str] | None,
    workdir: str,
    persist: bool = True,
) -> str:
    """The ``req`` file the spawner sources before running ``WRAPPER``. ``persist=False``
    neither restores nor saves the shell state (Harbor's stateless exec)."""
    env = env or {}
    check_env_names(env)
    oneoff = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    return (
        f"__apx_s={STATE_DIR if persist else ''}\n"
        f"__apx_cmd={shlex.quote(command)}\n"
        f"__apx_cwd={shlex.quote(cwd or '')}\n"
        f"__apx_workdir={shlex.quote(workdir)}\n"
        f"__apx_oneoff=({oneoff})\n"
    )


def bash_argv(
    command: str,
    cwd: str | None,
    env: Mapping[str, str] | None,
    workdir: str,
    start_env_names: Sequence[str] = (),
    persist: bool = True,
) -> list[str]:
    """``bash -c WRAPPER ...`` for launchers without a spawner. ``start_env_names`` are the
    variables the launcher's environment starts with, unset before the saved state is restored
    so that ``unset FOO`` persists too."""
    env = env or {}
    check_env_names(env)
    script = (
        "__apx_cmd=$1 __apx_cwd=$2 __apx_workdir=$3 __apx_s=$4; __apx_unset=($5); "
        '__apx_oneoff=("${@:6}")\n' + WRAPPER
    )
    return [
        "bash",
        "--noprofile",
        "--norc",
        "-c",
        script,
        "apprentice",
        command,
        cwd or "",
        workdir,
        STATE_DIR if persist else "",
        " ".join(n for n in start_env_names if _NAME.match(n) and n != EXEC_MARKER),
        *(f"{k}={v}" for k, v in env.items()),
    ]


def spawner_argv(request_fifo: str = "") -> list[str]:
    """The sandbox's pid 1. Requests come on stdin, or from ``request_fifo`` when given."""
    return [
        "bash",
        "--noprofile",
        "--norc",
        "-c",
        SPAWNER,
        "bash",
        CONTROL_DIR,
        WRAPPER,
        request_fifo,
    ]


def kill_marked_argv(exec_id: str) -> list[str]:
    return ["bash", "--noprofile", "--norc", "-c", KILL_MARKED, "apprentice-kill", exec_id]
