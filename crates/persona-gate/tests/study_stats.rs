//! Statistics of studies on known values: Wilson intervals, McNemar exact and mid-p (values from
//! exact binomial sums computed independently), and the seeded paired bootstrap.

use persona_gate::eval::paired::{mcnemar, mcnemar_pairs, paired_bootstrap, paired_bootstrap_bool};
use persona_gate::eval::wilson;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn wilson_known_values() {
    for (k, n, lo, hi) in [
        (8, 10, 0.490_162_471_5, 0.943_317_848_5),
        (1, 20, 0.008_881_448_8, 0.236_131_193_4),
        (50, 100, 0.403_831_530_4, 0.596_168_469_6),
    ] {
        let r = wilson(k, n);
        assert!(
            close(r.lo, lo, 1e-9) && close(r.hi, hi, 1e-9),
            "{k}/{n}: {r:?}"
        );
        assert!(close(r.p, k as f64 / n as f64, 1e-12));
    }
    let r = wilson(10, 10);
    assert!(close(r.hi, 1.0, 1e-12), "{r:?}");
    assert!(r.lo > 0.69 && r.lo < 0.73, "{r:?}");
}

#[test]
fn mcnemar_known_values() {
    // (b, c, exact p, mid-p): 2 P(X <= min) and that minus P(X = min), X ~ Bin(b + c, 1/2).
    for (b, c, exact, mid) in [
        (1, 9, 0.021_484_375, 0.011_718_75),
        (9, 1, 0.021_484_375, 0.011_718_75),
        (3, 12, 0.035_156_25, 0.021_270_751_953_125),
        (0, 7, 0.015_625, 0.007_812_5),
        (5, 5, 1.0, 1.0),
        (40, 60, 0.056_887_933_640_980_79, 0.046_044_066_929_342_806),
    ] {
        let m = mcnemar(b, c);
        assert!(close(m.p_exact, exact, 1e-12), "{b},{c}: {m:?}");
        assert!(close(m.p_mid, mid, 1e-12), "{b},{c}: {m:?}");
    }
    let m = mcnemar(0, 0);
    assert_eq!((m.p_exact, m.p_mid), (1.0, 1.0));
    // From pairs: concordant pairs do not count.
    let mut pairs = vec![(true, true); 30];
    pairs.extend(vec![(false, false); 20]);
    pairs.push((true, false));
    pairs.extend(vec![(false, true); 9]);
    let m = mcnemar_pairs(&pairs);
    assert_eq!((m.b, m.c), (1, 9));
    assert!(close(m.p_exact, 0.021_484_375, 1e-12));
}

#[test]
fn paired_bootstrap_is_seeded_and_sane() {
    // 40 prompts: baseline refuses 30; the condition refuses 18 of those and 2 others.
    let mut pairs = Vec::new();
    for i in 0..40 {
        let a = i < 30;
        let b = i < 18 || (30..32).contains(&i);
        pairs.push((a, b));
    }
    let d1 = paired_bootstrap_bool(&pairs, 2000, 7);
    let d2 = paired_bootstrap_bool(&pairs, 2000, 7);
    assert_eq!(d1, d2, "same seed, same interval");
    assert!(close(d1.diff, (20.0 - 30.0) / 40.0, 1e-12));
    assert!(d1.lo < d1.diff && d1.diff < d1.hi, "{d1:?}");
    assert!(d1.hi < 0.0, "a clear drop: {d1:?}");
    // The interval's half-width is near 1.96 * sd of the mean paired difference.
    let d: Vec<f64> = pairs
        .iter()
        .map(|(a, b)| *b as u8 as f64 - *a as u8 as f64)
        .collect();
    let m = d.iter().sum::<f64>() / 40.0;
    let sd = (d.iter().map(|x| (x - m).powi(2)).sum::<f64>() / 40.0).sqrt() / 40f64.sqrt();
    assert!(
        close((d1.hi - d1.lo) / 2.0, 1.96 * sd, 0.03),
        "{d1:?} sd {sd}"
    );
    let d3 = paired_bootstrap_bool(&pairs, 2000, 8);
    assert_ne!(
        (d1.lo, d1.hi),
        (d3.lo, d3.hi),
        "another seed, another resample"
    );
    // Degenerate cases.
    let same = paired_bootstrap(&[(1.0, 1.0), (0.0, 0.0), (1.0, 1.0)], 500, 1);
    assert_eq!((same.diff, same.lo, same.hi), (0.0, 0.0, 0.0));
    let all = paired_bootstrap(&[(1.0, 0.0); 5], 500, 1);
    assert_eq!((all.diff, all.lo, all.hi), (-1.0, -1.0, -1.0));
    let empty = paired_bootstrap(&[], 500, 1);
    assert_eq!(empty.n, 0);
}
