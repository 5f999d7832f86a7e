//! Progress of long library runs. The library reports through [`Progress`]; with the `progress` feature (on in
//! the `bpo` binary) [`bar`] draws it as an indicatif bar on stderr, and without it nothing is drawn.

/// Receives the progress of a run: its length once known, then one `inc` per finished unit.
pub trait Progress {
    fn set_length(&self, _len: u64) {}
    fn inc(&self, _n: u64) {}
    /// The run is over: remove the bar.
    fn finish(&self) {}
}

/// No progress shown.
impl Progress for () {}

#[cfg(feature = "progress")]
impl Progress for indicatif::ProgressBar {
    fn set_length(&self, len: u64) {
        indicatif::ProgressBar::set_length(self, len)
    }
    fn inc(&self, n: u64) {
        indicatif::ProgressBar::inc(self, n)
    }
    fn finish(&self) {
        self.finish_and_clear()
    }
}

/// The look of every bar: `template` with `=> ` as its fill (the default style if the template does not parse).
#[cfg(feature = "progress")]
pub fn style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// An indicatif bar of `total` steps on stderr, drawn with `template`.
#[cfg(feature = "progress")]
pub fn styled(total: u64, template: &str) -> indicatif::ProgressBar {
    indicatif::ProgressBar::new(total).with_style(style(template))
}

/// A bar of `unit`s with rate and ETA on stderr when `show` (and the `progress` feature) is on, else nothing.
pub fn bar(show: bool, unit: &str) -> Box<dyn Progress> {
    #[cfg(feature = "progress")]
    if show {
        return Box::new(styled(
            0,
            &format!("{{elapsed_precise}} [{{bar:40}}] {{pos}}/{{len}} {unit}, {{per_sec}}, ETA {{eta}}"),
        ));
    }
    let _ = (show, unit);
    Box::new(())
}
