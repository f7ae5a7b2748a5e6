//! Small helpers shared by the direction modules: vector arithmetic in f64 (dot, norm, cosine), UTC timestamps, and the
//! model's file hash for provenance.

use std::path::Path;

use crate::model::Model;

/// Dot product accumulated in f64 (directions are compared across layers whose norms differ by
/// orders of magnitude; f32 accumulation over thousands of entries loses digits).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

pub(crate) fn norm(a: &[f32]) -> f64 {
    dot(a, a).sqrt()
}

/// Cosine similarity, `None` when either vector is zero. Lives with the other vector helpers (not
/// in `geometry`) so that `set` can compare sets without depending on the report built on top of it.
pub fn cosine(a: &[f32], b: &[f32]) -> Option<f64> {
    let d = norm(a) * norm(b);
    (d > 0.0).then(|| (dot(a, b) / d).clamp(-1.0, 1.0))
}

/// `RFC 3339` UTC time of now, second precision (no date crate needed for one timestamp).
pub(crate) fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    utc_from_unix(secs)
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's days-from-civil inverse).
pub(crate) fn utc_from_unix(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// sha256 of the model's weights file, for a direction's provenance. Uses the `<file>.sha256`
/// sidecar that `scripts/setup-models.sh` writes after checking the download; hashes the file only
/// when `compute` is set (a gigabyte takes seconds). Multi-file (safetensors directory) models
/// return `None`: their identity is the directory and config, recorded elsewhere.
pub fn model_sha256(model: &Model, compute: bool) -> Option<String> {
    let [file] = model.info.files.as_slice() else {
        return None;
    };
    let real = std::fs::canonicalize(file).unwrap_or_else(|_| file.clone());
    let mut sidecar = real.clone().into_os_string();
    sidecar.push(".sha256");
    if let Ok(text) = std::fs::read_to_string(Path::new(&sidecar)) {
        let h = text.split_whitespace().next().unwrap_or("");
        if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) {
            return Some(h.to_ascii_lowercase());
        }
    }
    if compute {
        crate::hash::sha256_file(&real).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(utc_from_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_from_unix(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_from_unix(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
