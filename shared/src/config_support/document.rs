//! The first phase shared by the agent's and the collector's config: TOML into raw serde
//! structs, going on past unknown keys and wrongly typed values so that every one of them
//! is reported with its line and key path, not just the first.

use super::error::Collector;
use serde::de::DeserializeOwned;
use std::ops::Range;
use toml::de::{DeTable, DeValue};

/// How many type/unknown-key errors are collected before giving up on a document.
const MAX_SHAPE_ERRORS: usize = 100;

/// Deserializes `text` into the raw structs `T`; each unknown key or wrongly typed value is recorded,
/// removed from the tree, and the document tried again, so all of them are reported.
pub fn parse_document<T: DeserializeOwned>(text: &str, c: &mut Collector<'_>) -> Option<T> {
    let (mut doc, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in syntax {
            c.push(e.span(), "", format!("TOML syntax: {}", e.message()));
        }
        return None;
    }
    for _ in 0..MAX_SHAPE_ERRORS {
        let de = toml::de::Deserializer::from(doc.clone());
        match T::deserialize(de) {
            Ok(raw) => return Some(raw),
            Err(e) => {
                let key = e.span().and_then(|span| remove_at(doc.get_mut(), &span));
                let reason = e.message().to_owned();
                match key {
                    Some(key) => c.push(e.span(), key, reason),
                    None => {
                        c.push(e.span(), "", reason);
                        return None;
                    }
                }
            }
        }
    }
    c.push(None, "", "too many errors; fix these first");
    None
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// Removes the table entry whose key or value is at `span` (searching the whole tree:
/// a `[table]` header's span does not cover its body); returns its key path.
fn remove_at(table: &mut DeTable<'_>, span: &Range<usize>) -> Option<String> {
    let hit = table
        .iter()
        .find(|(key, value)| {
            key.span() == *span
                || value.span() == *span
                || (contains(&value.span(), span)
                    && !matches!(value.get_ref(), DeValue::Table(_) | DeValue::Array(_)))
        })
        .map(|(key, _)| key.clone());
    if let Some(key) = hit {
        let name = key.get_ref().to_string();
        table.remove(&key);
        return Some(name);
    }
    for (key, value) in table.iter_mut() {
        match value.get_mut() {
            DeValue::Table(inner) => {
                if let Some(path) = remove_at(inner, span) {
                    return Some(format!("{}.{path}", key.get_ref()));
                }
            }
            DeValue::Array(items) => {
                // An element of an array of scalars: remove the whole array.
                if items.iter().any(|item| {
                    item.span() == *span
                        || contains(&item.span(), span)
                            && !matches!(item.get_ref(), DeValue::Table(_))
                }) {
                    let k = key.clone();
                    let name = k.get_ref().to_string();
                    table.remove(&k);
                    return Some(name);
                }
                for (i, item) in items.iter_mut().enumerate() {
                    let label = match item
                        .get_ref()
                        .get("name")
                        .and_then(|n| n.get_ref().as_str())
                    {
                        Some(name) => name.to_owned(),
                        None => format!("#{}", i + 1),
                    };
                    if let DeValue::Table(inner) = item.get_mut() {
                        if let Some(path) = remove_at(inner, span) {
                            return Some(format!("{}[{label}].{path}", key.get_ref()));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    None
}
