//! Every kernel of the sources is compiled, registered with parameter types the emulator
//! supports, listed by `kernels::MODULES`, and launched by some test of this binary.

use crate::harness::{emu, kernel_names, Lib, SELFTEST};
use qgalore::backend::cuda::kernels::MODULES;
use std::ffi::{CStr, CString};
use std::path::Path;

/// The test files of this binary (all but this one), read when the test runs.
fn test_sources() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernel_emu");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs") && !p.ends_with("coverage.rs"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// The registry of `lib` must be the kernels of its source, each with parameter types
/// the emulator can pass.
fn check_registry(lib: &Lib, src: &'static str) {
    let reg = unsafe { CStr::from_ptr((lib.registered)()) }
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        reg,
        kernel_names(src).join(","),
        "{}: registered kernels",
        lib.module
    );
    for k in &lib.kernels {
        let sig = lib.signature(k);
        assert!(
            sig.iter().all(|p| !p.contains('?')),
            "{}/{k}: parameter of an unsupported type: {sig:?}",
            lib.module
        );
    }
}

#[test]
fn every_module_compiles_and_registers_its_kernels() {
    let Some(emu) = emu() else { return };
    assert_eq!(emu.libs.len(), MODULES.len());
    // a test launches a kernel by its name, written as a string literal
    let tests = test_sources();
    let mut missing = Vec::new();
    let libs = MODULES.iter().map(|m| m.src).chain([SELFTEST]);
    for (lib, src) in emu.libs.iter().chain([&emu.selftest]).zip(libs) {
        check_registry(lib, src);
        let (done, todo): (Vec<&str>, Vec<&str>) = lib.kernels.iter().partition(|k| {
            let lit = format!("\"{k}\"");
            tests.iter().any(|(_, text)| text.contains(&lit))
        });
        println!("{}: exercised {}", lib.module, done.join(" "));
        if !todo.is_empty() {
            missing.push(format!("{}: {}", lib.module, todo.join(" ")));
        }
    }
    // the device code loads the kernels kernels::MODULES lists: exactly those of the source
    for (m, lib) in MODULES.iter().zip(&emu.libs) {
        let (mut listed, mut defined) = (m.kernels.to_vec(), lib.kernels.clone());
        listed.sort_unstable();
        defined.sort_unstable();
        assert_eq!(
            listed, defined,
            "{}: kernels::MODULES vs the kernels of its source",
            m.name
        );
    }
    assert!(
        missing.is_empty(),
        "kernels compiled but NOT exercised by any test of tests/kernel_emu/:\n  {}",
        missing.join("\n  ")
    );
    // an unknown name is refused
    let lib = &emu.libs[0];
    let name = CString::new("no_such_kernel").unwrap();
    assert_eq!(
        unsafe { (lib.launch)(name.as_ptr(), 1, 1, 1, 1, 1, 1, std::ptr::null_mut()) },
        -1
    );
}
