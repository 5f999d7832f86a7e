//! The ranges settings must lie in, one check per kind of setting, used by every door a value comes through: the
//! command line (the CLI's value parsers parse the text and call these, so clap names the flag and exits with
//! status 2), a config file (`suite.toml`: [`check`] names the key) and the library's option structs. Each check
//! returns the value, or the words `must be ...` that state the range; NaN lies outside every range.

use std::fmt::Debug;
use std::time::Duration;

use crate::{Error, Result};

/// `v`, or an [`Error::Range`] naming the setting `name` (as its door spells it: `--judge-backoff`,
/// `suite.toml: [judge] backoff`), its value (`1e308`, `NaN`) and the range `f` states.
pub fn check<T: Debug + Copy, U>(name: &str, v: T, f: impl FnOnce(T) -> Result<U, String>) -> Result<U> {
    f(v).map_err(|why| Error::Range(format!("{name} = {v:?}: {why}")))
}

fn number(v: f64, ok: bool, range: &str) -> Result<f64, String> {
    if ok {
        Ok(v)
    } else {
        Err(format!("must be {range}"))
    }
}

/// A count of at least 1.
pub fn at_least_one(n: usize) -> Result<usize, String> {
    if n == 0 {
        Err("must be at least 1".into())
    } else {
        Ok(n)
    }
}

/// A finite number > 0.
pub fn positive(v: f64) -> Result<f64, String> {
    number(v, v > 0.0 && v.is_finite(), "a finite number > 0")
}

/// A finite number >= 0.
pub fn non_negative(v: f64) -> Result<f64, String> {
    number(v, v >= 0.0 && v.is_finite(), "a finite number >= 0")
}

/// A number in [0, 1].
pub fn fraction(v: f64) -> Result<f64, String> {
    number(v, (0.0..=1.0).contains(&v), "in [0, 1]")
}

/// A number in [0, 1): a dropout probability.
pub fn below_one(v: f64) -> Result<f64, String> {
    number(v, (0.0..1.0).contains(&v), "in [0, 1)")
}

/// A number in (0, 1]: a nucleus-sampling mass.
pub fn top_p(v: f64) -> Result<f64, String> {
    number(v, v > 0.0 && v <= 1.0, "in (0, 1]")
}

/// A number in [0, 0.5): a label-flip probability.
pub fn below_half(v: f64) -> Result<f64, String> {
    number(v, (0.0..0.5).contains(&v), "in [0, 0.5)")
}

/// A wait in seconds, in [0, `max`] (fractions allowed).
pub fn seconds(v: f64, max: Duration) -> Result<Duration, String> {
    let range = format!("a number of seconds in [0, {}]", max.as_secs_f64());
    number(v, (0.0..=max.as_secs_f64()).contains(&v), &range).map(Duration::from_secs_f64)
}

/// A time limit in whole seconds, in [1, `max`].
pub fn timeout_seconds(v: u64, max: Duration) -> Result<Duration, String> {
    if (1..=max.as_secs()).contains(&v) {
        Ok(Duration::from_secs(v))
    } else {
        Err(format!("must be a whole number of seconds in [1, {}]", max.as_secs()))
    }
}

/// Longest first wait before retrying an HTTP request (later waits double up to it).
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest time limit of one HTTP request attempt: a day.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

/// The first wait before retrying an HTTP request, in seconds: [0, [`MAX_BACKOFF`]].
pub fn backoff(v: f64) -> Result<Duration, String> {
    seconds(v, MAX_BACKOFF)
}

/// The time limit of one HTTP request attempt, in whole seconds: [1, [`MAX_TIMEOUT`]].
pub fn timeout(v: u64) -> Result<Duration, String> {
    timeout_seconds(v, MAX_TIMEOUT)
}

/// A string that is not empty (a stop string: an empty one would end every answer before it starts).
pub fn not_empty(s: &str) -> Result<&str, String> {
    if s.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_name_themselves_and_refuse_nan() {
        assert_eq!(at_least_one(0).unwrap_err(), "must be at least 1");
        assert!(positive(f64::NAN).is_err() && non_negative(f64::INFINITY).is_err() && top_p(0.0).is_err());
        assert_eq!(seconds(1e308, Duration::from_secs(30)).unwrap_err(), "must be a number of seconds in [0, 30]");
        assert!(seconds(f64::NAN, Duration::from_secs(30)).is_err());
        assert_eq!(seconds(0.5, Duration::from_secs(30)).unwrap(), Duration::from_millis(500));
        assert!(timeout_seconds(0, Duration::from_secs(60)).is_err());
        assert!(timeout_seconds(u64::MAX, Duration::from_secs(60)).is_err());
        let err = check("suite.toml: [judge] backoff", f64::NAN, |v| seconds(v, Duration::from_secs(30)));
        let err = err.unwrap_err();
        assert!(matches!(err, Error::Range(_)), "{err}");
        assert_eq!(err.to_string(), "suite.toml: [judge] backoff = NaN: must be a number of seconds in [0, 30]");
    }
}
