//! The emulator's own test: tests/emu/selftest.cu's kernels, each with a known defect
//! (or none), must fail (or run) as the emulator promises.

use crate::harness::{emu, Arg};
use qgalore::backend::cuda::launch::{self, Launch};

/// The emulator itself catches what it promises to: races between threads and between
/// blocks, deadlocks, full-mask shuffles in partial warps, accesses outside a buffer,
/// impossible launch shapes; and it runs correct code that relies on barriers, early
/// returns and warp shuffles.
#[test]
fn the_emulator_catches_defects() {
    let Some(emu) = emu() else { return };
    let t = &emu.selftest;
    let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let fails = |k: &str, cfg: Launch, n: usize, what: &str| {
        let mut a = vec![Arg::F32s(x[..n].to_vec())];
        let e = t
            .try_launch(k, cfg, &mut a)
            .err()
            .unwrap_or_else(|| panic!("{k} must fail"));
        assert!(e.contains(what), "{k}: {e}");
    };
    fails("shift_missing_barrier", launch::rows(1, 64), 64, "a race");
    fails("block_chain", launch::rows(8, 32), 8, "a race");
    fails("divergent_sync", launch::rows(1, 32), 32, "deadlock");
    fails(
        "write_before",
        launch::rows(1, 32),
        8,
        "wrote before the start of argument 0",
    );
    // a full-mask shuffle in a partial warp (48 threads), and after a lane returned
    fails(
        "warp_reduce",
        launch::rows(1, 48),
        48,
        "not a multiple of 32",
    );
    fails(
        "shuffle_after_return",
        launch::rows(1, 32),
        32,
        "undefined behaviour",
    );
    fails(
        "shift",
        launch::rows(1, 2048),
        64,
        "invalid launch configuration",
    );

    let mut a = vec![Arg::F32s(x.clone())];
    t.launch("shift", launch::rows(1, 64), &mut a);
    assert!(a[0]
        .f32s()
        .iter()
        .enumerate()
        .all(|(i, &v)| v == ((i + 1) % 64) as f32));
    let mut a = vec![Arg::F32s(x.clone())];
    t.launch("early_exit", launch::rows(1, 64), &mut a);
    assert!(a[0]
        .f32s()
        .iter()
        .enumerate()
        .all(|(i, &v)| v == if i < 40 { (39 - i) as f32 } else { i as f32 }));
    let mut a = vec![Arg::F32s(x.clone())];
    t.launch("warp_reduce", launch::rows(1, 64), &mut a);
    assert!(a[0]
        .f32s()
        .iter()
        .all(|&v| v == (0..64).sum::<i32>() as f32));

    // a read past the end of a real kernel's buffer
    let sanitize = emu.with("sanitize")[0];
    let n = 300;
    let mut a = vec![
        Arg::F32s(vec![0.0; n]),
        Arg::U64s(vec![0]),
        Arg::U64(n as u64 + 1),
    ];
    let e = sanitize
        .try_launch("sanitize", launch::elems(n + 1), &mut a)
        .err()
        .expect("an out-of-bounds read must fail");
    assert!(e.contains("0 bytes past the end of argument 0"), "{e}");
}
