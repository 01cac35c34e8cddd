//! Progress bars for long work, on stderr: drawn only when stderr is a terminal (indicatif
//! hides them otherwise) and never with `--quiet`, so stdout stays clean for pipes.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar that clears itself when dropped, so an early error return leaves no
/// half-drawn bar above the error message.
pub struct Bar(ProgressBar);

impl std::ops::Deref for Bar {
    type Target = ProgressBar;
    fn deref(&self) -> &ProgressBar {
        &self.0
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if !self.0.is_finished() {
            self.0.finish_and_clear();
        }
    }
}

/// A bar counting rows (rows/s shown); `total` when known.
pub fn rows(quiet: bool, total: Option<u64>, message: &str) -> Bar {
    let template = if total.is_some() {
        "{msg} {wide_bar} {human_pos}/{human_len} rows, {per_sec}, eta {eta}"
    } else {
        "{msg} {spinner} {human_pos} rows, {per_sec}, {elapsed}"
    };
    bar(quiet, total, message, template)
}

/// A bar counting bytes (MiB/s shown); `total` when known.
pub fn bytes(quiet: bool, total: Option<u64>, message: &str) -> Bar {
    let template = if total.is_some() {
        "{msg} {wide_bar} {binary_bytes}/{binary_total_bytes}, {binary_bytes_per_sec}, eta {eta}"
    } else {
        "{msg} {spinner} {binary_bytes}, {binary_bytes_per_sec}, {elapsed}"
    };
    bar(quiet, total, message, template)
}

/// A spinner for work whose size is unknown (a load the library runs after the rows were read).
pub fn spinner(quiet: bool, message: &str) -> Bar {
    let bar = bar(quiet, None, message, "{msg} {spinner} {elapsed}");
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

fn bar(quiet: bool, total: Option<u64>, message: &str, template: &str) -> Bar {
    if quiet {
        return Bar(ProgressBar::hidden());
    }
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_message(message.to_owned());
    Bar(bar)
}
