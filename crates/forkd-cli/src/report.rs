//! How errors and logs reach the user: `error:` / `Caused by:` / `hint:`.

use std::fmt::Write as _;
use std::io::IsTerminal as _;

pub fn init_tracing(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "error",
        // fuser logs every operation it does not implement (flush, xattrs) as a warning.
        (false, 0) => "warn,fuser=error",
        (false, 1) => "forkd=debug,info",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: piped logs stay plain text (and carry no escape bytes).
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_target(false)
        .without_time()
        .init();
}

/// A hint attached to an error chain with `.context(Hint("..."))` is printed as `hint:`.
#[derive(Debug)]
pub struct Hint(pub String);

impl std::fmt::Display for Hint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Hint {}

pub fn format_error(err: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut hints = Vec::new();
    let mut first = true;
    // A `.context(Hint(..))` layer shows up in `chain()` as anyhow's context wrapper, which does
    // not downcast to `Hint`; anyhow's own downcast_ref does find it, so match it by its text.
    let context_hint = err.downcast_ref::<Hint>().map(|h| h.0.clone());
    for cause in err.chain() {
        if let Some(h) = cause.downcast_ref::<Hint>() {
            hints.push(h.0.clone());
            continue;
        }
        if let Some(h) = &context_hint
            && cause.to_string() == *h
        {
            if !hints.contains(h) {
                hints.push(h.clone());
            }
            continue;
        }
        // Causes carry guest, QEMU and hub text: controls escaped (a guest console tail keeps
        // its lines).
        let text = cause.to_string();
        let text = escape_controls(&text, Lines::Keep);
        if first {
            let _ = writeln!(out, "error: {text}");
            first = false;
        } else {
            let _ = writeln!(out, "  Caused by: {text}");
        }
    }
    for h in hints {
        let _ = writeln!(out, "hint: {}", escape_controls(&h, Lines::Escape));
    }
    out
}

pub fn print_error(err: &anyhow::Error) {
    eprint!("{}", format_error(err));
}

/// Bytes for people: `1.5 GiB`, `320.0 KiB`, `12 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// forkd's exit codes, the same for every command (listed in `forkd --help`).
pub mod exit {
    /// Everything asked for was done.
    pub const OK: u8 = 0;
    /// An error: forkd could not do what was asked (bad reference, missing image, I/O, ...).
    pub const ERROR: u8 = 1;
    // 2: the command line is wrong (clap exits with it by itself).
    /// `fork`: forkd worked, but some children failed to come up, timed out, or their
    /// `--exec` command exited non-zero.
    pub const CHILDREN_FAILED: u8 = 3;
    /// `exec`: the command was killed for running over `--timeout` (as timeout(1) does).
    pub const TIMED_OUT: u8 = 124;
    /// Interrupted by Ctrl-C or SIGTERM (128 + SIGINT).
    pub const INTERRUPTED: u8 = 130;
}

/// The exit-code table for `forkd --help`.
pub const EXIT_CODES_HELP: &str = "Exit codes:\n  \
    0    success\n  \
    1    error: forkd could not do what was asked (the message says why)\n  \
    2    usage: the command line is wrong\n  \
    3    fork: some children failed to come up, timed out, or their --exec command exited non-zero\n  \
    124  exec: the command ran over --timeout and was killed\n  \
    130  interrupted (Ctrl-C / SIGTERM)\n  \
    N    exec: the command's own exit code (128+SIGNAL when a signal killed it)";

/// An error that ends forkd with a specific exit code (see [`exit`]); found by type in the
/// error chain by `main`.
#[derive(Debug)]
pub struct ExitWith {
    pub code: u8,
    pub message: String,
}

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExitWith {}

/// The exit code for an error: an [`ExitWith`] in its chain decides, an interrupted engine
/// operation is 130, anything else is 1.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<ExitWith>() {
            return e.code;
        }
        if let Some(forkd_engine::EngineError::Interrupted) =
            cause.downcast_ref::<forkd_engine::EngineError>()
        {
            return exit::INTERRUPTED;
        }
    }
    exit::ERROR
}

/// Whether newlines and tabs pass through [`escape_controls`] or are escaped too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lines {
    /// Keep `\n` and `\t` (a stream of output shown as it is).
    Keep,
    /// Escape them as well (one-line fields: table cells, error messages).
    Escape,
}

/// The one place text that forkd did not write itself — guest output, guest and QEMU text in
/// errors, hub catalogue strings — is made safe for a terminal: C0 and C1 control characters
/// (ESC, CR, backspace, CSI, ...), DEL and Unicode bidi overrides are shown escaped (`\x1b`,
/// `\r`, `\u{202e}`), so a guest cannot clear the screen, move the cursor or overwrite a line
/// with a fake "all ok".
pub fn escape_controls(text: &str, lines: Lines) -> std::borrow::Cow<'_, str> {
    let needs = |c: char| match c {
        '\n' | '\t' => lines == Lines::Escape,
        c => is_dangerous(c),
    };
    if !text.chars().any(needs) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if !needs(c) {
            out.push(c);
            continue;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

fn is_dangerous(c: char) -> bool {
    c.is_control() // C0, DEL and C1
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A writer that passes a byte stream through [`escape_controls`] (newlines kept): for raw
/// guest output on its way to a terminal. Bytes that are not UTF-8 are shown as `\xNN`; a
/// character split between two writes is held until its end arrives.
pub struct EscapingWriter<W: std::io::Write> {
    inner: W,
    pending: Vec<u8>,
}

impl<W: std::io::Write> EscapingWriter<W> {
    pub fn new(inner: W) -> Self {
        EscapingWriter {
            inner,
            pending: Vec::new(),
        }
    }

    fn emit(&mut self, data: &[u8], last: bool) -> std::io::Result<()> {
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(data);
        let mut out = String::new();
        let mut rest: &[u8] = &buf;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(&escape_controls(s, Lines::Keep));
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    // `good` is valid UTF-8: it ends at `valid_up_to`.
                    out.push_str(&escape_controls(
                        std::str::from_utf8(good).unwrap_or_default(),
                        Lines::Keep,
                    ));
                    match e.error_len() {
                        Some(n) => {
                            for b in &bad[..n] {
                                let _ = write!(out, "\\x{b:02x}");
                            }
                            rest = &bad[n..];
                        }
                        None if !last => {
                            rest = bad; // an incomplete character: wait for the rest
                            break;
                        }
                        None => {
                            for b in bad {
                                let _ = write!(out, "\\x{b:02x}");
                            }
                            rest = &[];
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        self.inner.write_all(out.as_bytes())
    }
}

impl<W: std::io::Write> std::io::Write for EscapingWriter<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.emit(data, false)?;
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<W: std::io::Write> Drop for EscapingWriter<W> {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            let _ = self.emit(&[], true);
            let _ = self.inner.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn controls_are_escaped() {
        assert_eq!(
            escape_controls("a\x1b[2Jb\rall ok\n", Lines::Keep),
            "a\\x1b[2Jb\\rall ok\n"
        );
        assert_eq!(escape_controls("x\ny\t", Lines::Escape), "x\\ny\\t");
        assert_eq!(
            escape_controls("\u{9b}2J\u{202e}", Lines::Keep),
            "\\u{9b}2J\\u{202e}"
        );
        assert_eq!(escape_controls("plain é ✓", Lines::Escape), "plain é ✓");
    }

    #[test]
    fn the_writer_holds_split_characters_and_shows_bad_bytes() {
        let mut out = Vec::new();
        {
            let mut w = EscapingWriter::new(&mut out);
            let e = "é".as_bytes();
            w.write_all(&[b'a', e[0]]).unwrap();
            w.write_all(&[e[1], 0x1b, 0xff, b'\n']).unwrap();
        }
        assert_eq!(String::from_utf8(out).unwrap(), "aé\\x1b\\xff\n");
    }
}
