//! What changed between two configurations, as field paths.
//!
//! Owns only the comparison; it never prints values, so secrets such as
//! `auth.customer_ref_key` can appear in the list of changed paths without
//! being logged. Arrays of tables that have a `name` (API keys, flash sales) are
//! matched by name, so reordering them is not a change and an edit reads as
//! `flash_sales[tv-drop].enabled` rather than an index.

use serde_json::Value;

use crate::model::Config;

/// Field paths whose values differ between `old` and `new`, sorted.
pub fn changed_paths(old: &Config, new: &Config) -> Vec<String> {
    let (Ok(old), Ok(new)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        // Serializing plain structs cannot fail; if it ever did, say "everything".
        return vec!["*".to_owned()];
    };
    let mut paths = Vec::new();
    walk("", &old, &new, &mut paths);
    paths.sort();
    paths
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn walk(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(old_map), Value::Object(new_map)) => {
            for (key, old_value) in old_map {
                match new_map.get(key) {
                    Some(new_value) => walk(&join(path, key), old_value, new_value, out),
                    None => out.push(join(path, key)),
                }
            }
            for key in new_map.keys().filter(|key| !old_map.contains_key(*key)) {
                out.push(join(path, key));
            }
        }
        (Value::Array(old_items), Value::Array(new_items))
            if all_named(old_items) && all_named(new_items) =>
        {
            for old_item in old_items {
                let name = item_name(old_item);
                let item_path = format!("{path}[{name}]");
                match new_items.iter().find(|item| item_name(item) == name) {
                    Some(new_item) => walk(&item_path, old_item, new_item, out),
                    None => out.push(item_path),
                }
            }
            for new_item in new_items {
                let name = item_name(new_item);
                if !old_items.iter().any(|item| item_name(item) == name) {
                    out.push(format!("{path}[{name}]"));
                }
            }
        }
        _ if old != new => out.push(path.to_owned()),
        _ => {}
    }
}

fn item_name(item: &Value) -> &str {
    item.get("name").and_then(Value::as_str).unwrap_or_default()
}

fn all_named(items: &[Value]) -> bool {
    items
        .iter()
        .all(|item| item.get("name").is_some_and(Value::is_string))
}
