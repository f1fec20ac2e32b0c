//! Any text given to `ctl apply` goes through the anchor/alias scan, the
//! strict parser, the sealer and the compiler: none of them may panic, and a
//! document the sealer accepts must not keep a plain `value:` key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_control::secrets::{MasterKey, MasterKeys, MASTER_KEY_ENV};
use switchyard_control::{compile_policy, parse_policy, PolicyOptions};

const KEY: &str = "3c1f9a0e7b52d4686e0b9c27f1a3d5e4902b7c6a18f4e3d25c9b0a7e6f1d2c38";

fuzz_target!(|data: &[u8]| {
    let Ok(yaml) = std::str::from_utf8(data) else {
        return;
    };
    let keys = MasterKeys {
        current: Some(MasterKey::from_hex(KEY, MASTER_KEY_ENV).unwrap()),
        previous: None,
    };
    if let Ok(sealed) = switchyard_control::secrets::seal_document(yaml, &keys, true) {
        if let Some(text) = &sealed.yaml {
            let doc = parse_policy(text).expect("the sealer wrote an unparsable document");
            assert!(doc
                .providers
                .values()
                .flat_map(|p| &p.key_pools)
                .flat_map(|pool| &pool.keys)
                .all(|k| k.value.is_none()));
        }
    }
    if let Ok(doc) = parse_policy(yaml) {
        let no_env = |_: &str| None;
        let _ = compile_policy(
            &doc,
            &PolicyOptions {
                env: &no_env,
                include_simulated: false,
                env_providers: false,
                version: 1,
                master_keys: Some(&keys),
            },
        );
    }
});
