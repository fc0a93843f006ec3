"""Run a pinned llama.cpp tool in this process and drain its log queue before exiting.

    python -m cpuforge.llama.tool BIN/llama-perplexity -m model.gguf -f text.txt ...

The tools of the pinned commit print through common/log.cpp, whose worker thread
is deliberately leaked at exit (upstream issue 22142), so the last lines, which
are exactly llama-perplexity's final estimate and KL summary, are sometimes lost
on a busy machine. Each tool binary is a thin main around `lib<tool>-impl.so`;
calling that library's entry point here and then `common_log_pause`, which
drains the queue and joins the thread, makes the output complete every time.
"""

import ctypes
import sys
from pathlib import Path


def tool_main(tool: Path, args: list[str]) -> int:
    name = tool.name.replace("-", "_")
    impl = ctypes.CDLL(str(tool.with_name(f"lib{tool.name}-impl.so")))
    common = ctypes.CDLL(str(tool.with_name("libllama-common.so")))
    # C++ names: int llama_<tool>(int, char**), common_log * common_log_main(), void common_log_pause(common_log *)
    entry = getattr(impl, f"_Z{len(name)}{name}iPPc")
    entry.restype, entry.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    log_main = common._Z15common_log_mainv
    log_main.restype = ctypes.c_void_p
    log_pause = common._Z16common_log_pauseP10common_log
    log_pause.argtypes = [ctypes.c_void_p]
    argv = [str(tool), *args]
    code = entry(len(argv), (ctypes.c_char_p * len(argv))(*(a.encode() for a in argv)))
    log_pause(log_main())
    ctypes.CDLL(None).fflush(None)
    return code


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(tool_main(Path(sys.argv[1]), sys.argv[2:]))


if __name__ == "__main__":
    main()
