//! Keeps `docs/discover-api.md` true: its full example must pass validation, use every
//! field of the contract, and every field must be documented on the page.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use sidemesh_api::Snapshot;

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/discover-api.md");
    std::fs::read_to_string(path).expect("docs/discover-api.md")
}

/// The first ```json block after the "## A full example" heading.
fn example(doc: &str) -> &str {
    let section = doc
        .split_once("## A full example")
        .expect("a \"## A full example\" section")
        .1;
    let start = section.find("```json\n").expect("a json block") + "```json\n".len();
    let len = section[start..]
        .find("```")
        .expect("the end of the json block");
    &section[start..start + len]
}

/// Every object key in a JSON value, at any depth, except inside free-form maps.
fn keys(v: &serde_json::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                out.insert(k.clone());
                // Keys of these maps are data (label names, header names, variables).
                if !["labels", "subset", "set", "variables"].contains(&k.as_str()) {
                    keys(v, out);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| keys(i, out)),
        _ => {}
    }
}

#[test]
fn the_full_example_passes_validation() {
    let doc = doc();
    let snapshot = Snapshot::from_json(example(&doc).as_bytes())
        .unwrap_or_else(|e| panic!("the example in docs/discover-api.md is invalid: {e}"));
    assert_eq!(snapshot.version(), 42);
    assert_eq!(
        snapshot.resolve("tomcat.shop.svc.cluster.local"),
        Some("127.1.0.7".parse().unwrap())
    );
}

#[test]
fn the_full_example_uses_every_field_and_the_page_documents_each() {
    let doc = doc();
    let raw: serde_json::Value = serde_json::from_str(example(&doc)).unwrap();
    let mut used = BTreeSet::new();
    keys(&raw, &mut used);
    // Serializing the parsed config writes every field the types have (defaults included).
    let snapshot = Snapshot::from_json(example(&doc).as_bytes()).unwrap();
    let all: serde_json::Value = serde_json::from_slice(&snapshot.to_json()).unwrap();
    let mut fields = BTreeSet::new();
    keys(&all, &mut fields);
    let unused: Vec<_> = fields.difference(&used).collect();
    assert!(unused.is_empty(), "the full example lacks {unused:?}");
    let undocumented: Vec<_> = fields
        .iter()
        .filter(|f| !doc.contains(&format!("`{f}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "docs/discover-api.md does not document {undocumented:?}"
    );
}
