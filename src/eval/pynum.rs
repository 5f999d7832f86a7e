//! The few Python and NumPy number rules the official judged-benchmark scripts rely on, reproduced so that
//! bpo parses replies and rounds results exactly as they do.
//!
//! - [`py_float`]: Python's `float(str)` on the strings a judge sends back (whitespace stripped, `_` between
//!   digits, `inf`/`nan` spellings). Non-finite values are refused: the official scripts would accept `nan`
//!   and print `nan` totals; here such a reply counts as "not a score".
//! - [`py_round`]: Python's `round(x, n)` on a `float` (correctly rounded, ties to even on the exact binary
//!   value). Rust's `{:.n}` formatting follows the same rule, so the value is formatted and read back.
//! - [`np_round`]: NumPy's `round(np.float64, n)` = `rint(x * 10^n) / 10^n`, which differs from Python's
//!   (`round(np.float64(0.35), 1)` is 0.4, `round(0.35, 1)` is 0.3). MM-Vet rounds NumPy values this way.
//! - [`np_mean`] / [`np_std`]: `ndarray.mean()` / `.std()` (population, ddof 0) of short arrays, summed left
//!   to right as NumPy does for fewer than 8 elements.

/// Python's `str.strip()` with no argument: `str.isspace` characters, which include the ASCII separators
/// U+001C..U+001F that Rust's `char::is_whitespace` leaves out.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// Python's `float(s)` for a finite result; `None` where Python raises (or returns `inf`/`nan`).
pub fn py_float(s: &str) -> Option<f64> {
    // float() strips Unicode white space but not U+001C..U+001F (CPython 3: float("\x1f0.3") raises).
    let t = s.trim();
    // PEP 515: an underscore is allowed only between two digits.
    let bytes = t.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'_' {
            let digit = |j: Option<usize>| j.and_then(|j| bytes.get(j)).is_some_and(u8::is_ascii_digit);
            if !digit(i.checked_sub(1)) || !digit(Some(i + 1)) {
                return None;
            }
        }
    }
    let cleaned = t.replace('_', "");
    // Rust accepts the same decimal syntax as Python (sign, "5.", ".5", exponent) and rejects "" and ".".
    cleaned.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// Python's built-in `round(x, digits)` on a `float`.
pub fn py_round(x: f64, digits: usize) -> f64 {
    format!("{x:.digits$}").parse().unwrap_or(x)
}

/// NumPy's `round(x, digits)` on an `np.float64`: `rint(x * 10^digits) / 10^digits`, ties to even.
pub fn np_round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round_ties_even() / f
}

/// `np.mean` of a short array (sum left to right, then one division), 0 for an empty one.
pub fn np_mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// `np.std` (ddof 0) of a short array: the square root of the mean squared deviation.
pub fn np_std(xs: &[f64]) -> f64 {
    let mean = np_mean(xs);
    let dev: Vec<f64> = xs.iter().map(|x| (x - mean).abs().powi(2)).collect();
    np_mean(&dev).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_syntax() {
        // Each case: what CPython 3's float() returns (None = ValueError or a non-finite value).
        let cases: &[(&str, Option<f64>)] = &[
            ("0.5", Some(0.5)),
            (" 0.5\n", Some(0.5)),
            ("1", Some(1.0)),
            (".5", Some(0.5)),
            ("5.", Some(5.0)),
            ("+0.1", Some(0.1)),
            ("1e-1", Some(0.1)),
            ("0.1_0", Some(0.1)),
            ("1__0", None),
            ("_1", None),
            ("", None),
            (".", None),
            ("0.5.", None),
            ("0,5", None),
            ("nan", None),
            ("inf", None),
            ("\u{a0}0.3", Some(0.3)),
            ("\u{1f}0.3", None),
        ];
        for (s, want) in cases {
            assert_eq!(py_float(s), *want, "{s:?}");
        }
    }

    #[test]
    fn python_strip_removes_ascii_separators() {
        // CPython: "\x1f0.3 ".strip() == "0.3".
        assert_eq!(py_strip("\u{1f}0.3 "), "0.3");
    }

    #[test]
    fn python_and_numpy_rounding_differ_where_they_should() {
        // CPython: round(0.25, 1) = 0.2, round(0.35, 1) = 0.3, round(2.675, 2) = 2.67, round(1.05, 1) = 1.1.
        // NumPy 2.4: round(np.float64(x), n) gives 0.2, 0.4, 2.68, 1.0 and round(np.float64(0.15), 1) = 0.2.
        assert_eq!(
            [py_round(0.25, 1), py_round(0.35, 1), py_round(2.675, 2), py_round(1.05, 1)],
            [0.2, 0.3, 2.67, 1.1]
        );
        assert_eq!(
            [np_round(0.25, 1), np_round(0.35, 1), np_round(2.675, 2), np_round(1.05, 1)],
            [0.2, 0.4, 2.68, 1.0]
        );
        assert_eq!(np_round(0.15, 1), 0.2);
    }

    #[test]
    fn mean_and_population_std() {
        assert_eq!(np_mean(&[]), 0.0);
        assert_eq!(np_mean(&[1.0, 2.0, 4.0]), 7.0 / 3.0);
        assert_eq!(np_std(&[2.0, 4.0]), 1.0);
        assert_eq!(np_std(&[3.0]), 0.0);
    }
}
