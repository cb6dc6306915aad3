//! How errors and logs reach the user: `error:` / `Caused by:` / `hint:`.

use std::fmt::Write as _;

pub fn init_tracing(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "forkd=debug,info",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
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
        if first {
            let _ = writeln!(out, "error: {cause}");
            first = false;
        } else {
            let _ = writeln!(out, "  Caused by: {cause}");
        }
    }
    for h in hints {
        let _ = writeln!(out, "hint: {h}");
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
