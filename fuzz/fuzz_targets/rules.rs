//! Rule files (`rules add FILE`, the `[[rule]]`/`[[deny]]` tables): any text loads or names the
//! rule at fault. A file that loads must compile, and must survive the TOML round trip the
//! daemon uses to keep runtime rules across restarts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use precedent::rules::{RuleFile, RuleSet};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = RuleFile::from_toml_str(text) else {
        return;
    };
    let saved = file.to_toml_string();
    let back = RuleFile::from_toml_str(&saved)
        .unwrap_or_else(|e| panic!("saved rules do not load again: {e}\n{saved}"));
    assert_eq!(back, file, "rules changed through save and load");
    RuleSet::new(file).expect("validated rules compile");
});
