//! The CLI's progress reporter for hub transfers: an indicatif bar (bytes, rate, ETA) on a
//! terminal, plain stderr lines otherwise, nothing with --quiet.

use crate::ctx::Ctx;
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;

pub struct Bars {
    show_bars: bool,
    quiet: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    pub fn new(ctx: &Ctx) -> Self {
        Self {
            show_bars: ctx.show_progress(),
            quiet: ctx.quiet,
            bar: Mutex::new(None),
        }
    }
}

impl Bars {
    /// Messages only, no bar: for a download that runs beside another bar (a lazy fork's).
    pub fn messages_only(ctx: &Ctx) -> Self {
        Self {
            show_bars: false,
            quiet: ctx.quiet,
            bar: Mutex::new(None),
        }
    }
}

impl forkd_hub::Progress for Bars {
    fn message(&self, msg: &str) {
        if self.quiet {
            return;
        }
        match &*self.bar.lock().expect("bar lock") {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    fn start(&self, phase: &str, total: u64) {
        if !self.show_bars {
            return;
        }
        let b = ProgressBar::new(total).with_prefix(phase.to_string());
        b.set_style(
            ProgressStyle::with_template(
                "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        *self.bar.lock().expect("bar lock") = Some(b);
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = &*self.bar.lock().expect("bar lock") {
            b.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().expect("bar lock").take() {
            b.finish_and_clear();
        }
    }
}
