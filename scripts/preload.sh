# Sourced by the run scripts. Preloads tcmalloc (vLLM's own recommendation for its CPU backend): on
# glibc malloc the vLLM worker's RSS keeps creeping up under concurrent streams; on tcmalloc it levels
# off (docs/reliability.md#memory). vLLM forks its EngineCore and worker from this process, so the
# allocator has to be in place when the interpreter starts: LD_PRELOAD, not an import.
if [[ ":${LD_PRELOAD:-}:" != *libtcmalloc* ]]; then
  TCMALLOC="$( (ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null) |
    awk '/libtcmalloc_minimal\.so\.4 /{print $NF; exit}' || true)"
  if [ -z "$TCMALLOC" ]; then
    for f in /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4; do
      if [ -f "$f" ]; then TCMALLOC="$f"; break; fi
    done
  fi
  if [ -n "$TCMALLOC" ] && [ -f "$TCMALLOC" ]; then
    export LD_PRELOAD="$TCMALLOC${LD_PRELOAD:+:$LD_PRELOAD}"
  fi
fi
