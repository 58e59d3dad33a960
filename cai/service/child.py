"""`python -m cai.service.child SERVER_PID ARGS...`: become `python -m cai.cli ARGS...`, set to die with the
server. A job outliving a server killed with kill -9 would keep writing to a run directory the restarted
server offers to resume: two writers on one run. (Popen's preexec_fn could set this too, but it is unsafe
in a process with threads, which the server is.)"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    server_pid, args = int(sys.argv[1]), sys.argv[2:]
    if sys.platform == "linux":
        # Fires when the thread that started us exits: the server's worker thread, which lives as long as the server.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != server_pid:  # the server died before the line above: nobody will signal us
            sys.exit(137)
    # The server cancels and stops a job with SIGINT (the job keeps its rows and exits 130). A server started
    # in the background of a script (`nohup cai serve &`) has SIGINT ignored, which its jobs would inherit.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execv(sys.executable, [sys.executable, "-m", "cai.cli", *args])


if __name__ == "__main__":
    main()
