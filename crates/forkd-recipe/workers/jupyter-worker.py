"""forkd warm worker: a Jupyter kernel (installed as /usr/lib/forkd/workers/jupyter-worker.py).

Runs an IPython kernel in-process (ipykernel's InProcessKernelManager: the real kernel, its
shell, display hooks and magics, without ZeroMQ sockets) and executes each message it gets as
one cell. Started by the forkd guest agent before the parent snapshot, so forked children
execute cells in a kernel that has already imported its libraries.

Framing on stdin/stdout, as the agent's worker protocol (docs/AGENT-PROTOCOL.md): a decimal
byte count, a newline, then that many bytes of UTF-8; one answer per cell. The answer is the
cell's output as text: streams, then `text/plain` of results and displays, then the
traceback of an error (without colours).

With `--js`, a warm Node.js worker (node-worker.js) is started next to the kernel, and cells
that begin with `%%js` or `%%javascript` are evaluated there (an E2B-style code interpreter).
"""

import os
import re
import subprocess
import sys

# Keep private copies of the framing channel, and point fds 0/1 at /dev/null so that nothing a
# cell runs (a subprocess, a C library) can write into the frames.
_fin = os.fdopen(os.dup(0), "rb", buffering=0)
_fout = os.fdopen(os.dup(1), "wb", buffering=0)
_null = os.open(os.devnull, os.O_RDWR)
os.dup2(_null, 0)
os.dup2(_null, 1)
os.environ.setdefault("MPLBACKEND", "Agg")

from ipykernel.inprocess.manager import InProcessKernelManager  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
NODE_WORKER = "/usr/lib/forkd/workers/node-worker.js"
FLUSH = "import sys as _forkd_sys; _forkd_sys.stdout.flush(); _forkd_sys.stderr.flush()"


def read_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = _fin.read(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def read_frame():
    line = b""
    while not line.endswith(b"\n"):
        c = _fin.read(1)
        if not c:
            raise EOFError
        line += c
    return read_exact(int(line)).decode("utf-8", "replace")


def write_frame(text):
    data = text.encode("utf-8", "replace")
    _fout.write(b"%d\n" % len(data) + data)


class NodeWorker:
    """A warm node-worker.js child, spoken to with the same framing."""

    def __init__(self):
        self.proc = subprocess.Popen(
            ["/usr/bin/node", NODE_WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def run(self, code):
        data = code.encode()
        self.proc.stdin.write(b"%d\n" % len(data) + data)
        self.proc.stdin.flush()
        header = self.proc.stdout.readline()
        if not header:
            return "node worker exited\n"
        return self.proc.stdout.read(int(header)).decode("utf-8", "replace")


def start_kernel():
    km = InProcessKernelManager()
    km.start_kernel(show_banner=False)
    kc = km.client()
    kc.start_channels()
    return km, kc


def collect(kc):
    """Turn the iopub messages of the last execution into text. Cells run one at a time and
    synchronously, so everything queued belongs to it (stream messages do not always carry the
    cell's parent header)."""
    out = []
    while True:
        try:
            msg = kc.iopub_channel.get_msg(timeout=0.01)
        except Exception:  # queue.Empty: everything the cell produced has been read
            break
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind in ("execute_result", "display_data"):
            text = content.get("data", {}).get("text/plain")
            if text is not None:
                out.append(text + "\n")
        elif kind == "error":
            out.append(ANSI.sub("", "\n".join(content.get("traceback", []))) + "\n")
    return "".join(out)


def main():
    km, kc = start_kernel()
    if "--js" in sys.argv[1:]:
        node = NodeWorker()

        def js(line, cell):
            print(node.run(cell), end="")

        km.kernel.shell.register_magic_function(js, "cell", "js")
        km.kernel.shell.register_magic_function(js, "cell", "javascript")
    while True:
        try:
            code = read_frame()
        except (EOFError, ValueError):
            return
        collect(kc)  # drop anything left over (e.g. output of background threads)
        kc.execute(code)
        # Streams are buffered by the kernel; a silent second execution flushes them.
        kc.execute(FLUSH, silent=True, store_history=False)
        write_frame(collect(kc))


if __name__ == "__main__":
    main()
