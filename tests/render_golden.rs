//! Golden files for the Packer templates rendered from the shipped example templates, for both
//! builders and both virtualization types. Regenerate with `BAKER_UPDATE_GOLDEN=1 cargo test
//! --test render_golden` and review the diff.

mod support_render;

use support_render::{COMBINATIONS, render_example};

#[test]
fn rendered_templates_match_golden_files() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("BAKER_UPDATE_GOLDEN").is_some();
    let mut mismatched = Vec::new();
    for (template, virt) in COMBINATIONS {
        let rendered = render_example(template, virt);
        let file = dir.join(format!("{template}-{virt}.json"));
        if update {
            std::fs::write(&file, &rendered).expect("write golden file");
            continue;
        }
        let golden = std::fs::read_to_string(&file).unwrap_or_default();
        if golden != rendered {
            mismatched.push(file.display().to_string());
        }
    }
    assert!(
        mismatched.is_empty(),
        "rendered templates differ from {mismatched:?}; set BAKER_UPDATE_GOLDEN=1 to regenerate"
    );
}
