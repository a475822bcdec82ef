//! Component revisions for rollbacks: each component's last revisions are kept with
//! their full spec (the `[[component]]` table) in the durable store, and a rollback
//! *pins* a component to one of them.
//!
//! A pin is a small TOML file `<data_dir>/pins/<component>.toml` holding the spec to run
//! and the hash of the file's own spec at the time of the rollback. It overlays the file
//! config at start and at every reload ([`load_effective`]) for as long as the file still
//! carries that same spec; once an operator changes the component's spec in the file,
//! the file wins again and the pin is removed (their new intent replaces the rollback).
//! Pins are plain files so an operator can see (and delete) them.
//!
//! A revision pushed by the collector (a deployment, [`deploy`]) is held the same way: a
//! pin whose spec is the file's own table of the component with `command`, `args`,
//! `env` and `revision` replaced (probes, limits, GPUs stay as the file says). It
//! survives an agent restart, enters the revision history when it runs (so a
//! `Rollback` to `previous` returns to what ran before it), and yields to the operator
//! like a rollback does: once the file's own spec of the component changes, the file
//! wins and the pin goes. A later deployment or rollback replaces the pin.

use crate::config::{Config, ConfigErrors};
use crate::store::{Store, StoreError, StoredRevision};
use razar_shared::protocol::{RevisionSpec, UnixMillis};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Directory of the pin files inside the data directory.
pub const PINS_DIR: &str = "pins";

/// Why a rollback or a deployment could not be carried out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RollbackError {
    #[error("no component {0:?} is configured on this host")]
    UnknownComponent(String),
    #[error("{component} has no recorded revision {wanted:?} (known: {known})")]
    UnknownRevision {
        component: String,
        wanted: String,
        known: String,
    },
    #[error("{0} has no earlier revision to roll back to")]
    NoPrevious(String),
    #[error("agent store: {0}")]
    Store(#[from] StoreError),
    #[error("the rolled-back config does not validate: {0}")]
    Config(#[from] ConfigErrors),
    #[error("{what}: {reason}")]
    Io { what: String, reason: String },
    #[error("the pushed revision is invalid: {0}")]
    InvalidRevision(String),
}

/// Each `[[component]]` table of a config text, by name (none when the text is not TOML).
pub fn component_tables(text: &str) -> BTreeMap<String, toml::Table> {
    let Ok(root) = text.parse::<toml::Table>() else {
        return BTreeMap::new();
    };
    let Some(toml::Value::Array(items)) = root.get("component") else {
        return BTreeMap::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let table = item.as_table()?;
            let name = table.get("name")?.as_str()?.to_owned();
            Some((name, table.clone()))
        })
        .collect()
}

/// The spec hash of `component` as `config` runs it (what its revision history records).
pub fn spec_hash(config: &Config, component: &str) -> Option<String> {
    config.component_sources.get(component).map(|s| sha256(s))
}

fn sha256(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Records the revision each active component of `config` runs (blocking: redb).
/// Returns the components whose history grew.
pub fn record_running(store: &Store, config: &Config, now: UnixMillis) -> Vec<String> {
    let mut grew = Vec::new();
    for component in config.active_components() {
        let name = component.name.as_str();
        let Some(spec) = config.component_sources.get(name) else {
            continue;
        };
        let revision = StoredRevision {
            revision: component.revision.clone(),
            spec_hash: sha256(spec),
            spec: spec.clone(),
            first_ms: now,
        };
        match store.push_revision(name, revision) {
            Ok(true) => grew.push(name.to_owned()),
            Ok(false) => {}
            Err(error) => tracing::warn!(component = name, %error, "cannot record the revision"),
        }
    }
    grew
}

/// A rollback pin as stored in its file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pin {
    /// The revision label pinned.
    revision: String,
    /// sha256 of the file's own spec of the component when it was pinned.
    file_spec: String,
    /// The spec to run instead (a `[[component]]` table).
    spec: toml::Table,
}

fn pin_path(data_dir: &Path, component: &str) -> PathBuf {
    data_dir.join(PINS_DIR).join(format!("{component}.toml"))
}

/// Pins `component` to `revision` (a label, a spec hash, or `previous` / empty for the
/// one before the current) and returns the config to apply. Blocking (store, files).
pub fn roll_back(
    store: &Store,
    current: &Config,
    component: &str,
    revision: &str,
) -> Result<(Config, String), RollbackError> {
    let running = current
        .component(component)
        .ok_or_else(|| RollbackError::UnknownComponent(component.to_owned()))?;
    let history = store.revision_history(component)?;
    let target = if revision.is_empty() || revision == "previous" {
        let running_hash = current
            .component_sources
            .get(component)
            .map(|s| sha256(s))
            .unwrap_or_default();
        history
            .iter()
            .rev()
            .find(|r| r.spec_hash != running_hash)
            .ok_or_else(|| RollbackError::NoPrevious(component.to_owned()))?
    } else {
        history
            .iter()
            .rev()
            .find(|r| r.revision == revision || r.spec_hash == revision)
            .ok_or_else(|| RollbackError::UnknownRevision {
                component: component.to_owned(),
                wanted: revision.to_owned(),
                known: history
                    .iter()
                    .map(|r| r.revision.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?
    };
    let spec: toml::Table = target.spec.parse().map_err(|e| RollbackError::Io {
        what: format!("stored spec of {component} {}", target.revision),
        reason: format!("{e}"),
    })?;
    let file_text = std::fs::read_to_string(&current.path).map_err(|e| RollbackError::Io {
        what: format!("reading {}", current.path.display()),
        reason: e.to_string(),
    })?;
    let file_spec = component_tables(&file_text)
        .get(component)
        .and_then(|t| toml::to_string(t).ok())
        .map(|s| sha256(&s))
        .unwrap_or_default();
    let pin = Pin {
        revision: target.revision.clone(),
        file_spec,
        spec,
    };
    let mut pins = BTreeMap::new();
    pins.insert(component.to_owned(), pin.clone());
    let config = overlay(&current.path, &file_text, &pins)?;
    if config.component(component).is_none() {
        return Err(RollbackError::UnknownComponent(component.to_owned()));
    }
    write_pin(&current.agent.data_dir, component, &pin, "a rollback")?;
    let from = running.revision.clone();
    Ok((config, format!("{component}: {from} → {}", target.revision)))
}

/// The file's own table of `component` with the pushed revision's `command`, `args`,
/// `env` and `revision` in place of its own (an empty version: the spec digest, as for
/// a file spec without `revision`).
fn revision_table(file_table: &toml::Table, spec: &RevisionSpec) -> Result<toml::Table, String> {
    if spec.command.trim().is_empty() {
        return Err("empty command".into());
    }
    let mut env = toml::Table::new();
    for (key, value) in &spec.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(format!("invalid environment variable {key:?}"));
        }
        env.insert(key.clone(), toml::Value::String(value.clone()));
    }
    let mut table = file_table.clone();
    table.insert("command".into(), toml::Value::String(spec.command.clone()));
    table.insert(
        "args".into(),
        toml::Value::Array(
            spec.args
                .iter()
                .map(|a| toml::Value::String(a.clone()))
                .collect(),
        ),
    );
    if env.is_empty() {
        table.remove("env");
    } else {
        table.insert("env".into(), toml::Value::Table(env));
    }
    if spec.version.is_empty() {
        table.remove("revision");
    } else {
        table.insert("revision".into(), toml::Value::String(spec.version.clone()));
    }
    Ok(table)
}

/// Pins `component` to a revision pushed by the collector and returns the config to
/// apply (the file's config with every pin, this one included) and a summary
/// `component: from → to`. Blocking (files). See the module docs for how the pin and
/// the file interact.
pub fn deploy(
    current: &Config,
    component: &str,
    spec: &RevisionSpec,
) -> Result<(Config, String), RollbackError> {
    let unknown = || RollbackError::UnknownComponent(component.to_owned());
    let running = current.component(component).ok_or_else(unknown)?;
    let file_text = std::fs::read_to_string(&current.path).map_err(|e| RollbackError::Io {
        what: format!("reading {}", current.path.display()),
        reason: e.to_string(),
    })?;
    let tables = component_tables(&file_text);
    let file_table = tables.get(component).ok_or_else(unknown)?;
    let table = revision_table(file_table, spec).map_err(RollbackError::InvalidRevision)?;
    let file_spec = toml::to_string(file_table)
        .map(|s| sha256(&s))
        .unwrap_or_default();
    let mut pin = Pin {
        revision: spec.version.clone(),
        file_spec,
        spec: table,
    };
    let mut pins = BTreeMap::new();
    pins.insert(component.to_owned(), pin.clone());
    // Refused here, before anything is written, when the new spec does not validate.
    let alone = overlay(&current.path, &file_text, &pins)?;
    let to = alone
        .component(component)
        .ok_or_else(unknown)?
        .revision
        .clone();
    pin.revision.clone_from(&to);
    write_pin(&current.agent.data_dir, component, &pin, "a deployment")?;
    // With every other pin too, as the next start or reload will apply them.
    let (config, _notes) = load_effective(&current.path)?;
    if config.component(component).map(|c| c.revision.as_str()) != Some(to.as_str()) {
        let _ = std::fs::remove_file(pin_path(&current.agent.data_dir, component));
        return Err(RollbackError::InvalidRevision(format!(
            "{component} {to} does not validate together with the other pins"
        )));
    }
    Ok((config, format!("{component}: {} → {to}", running.revision)))
}

fn write_pin(data_dir: &Path, component: &str, pin: &Pin, by: &str) -> Result<(), RollbackError> {
    let io = |what: &str, e: std::io::Error| RollbackError::Io {
        what: what.to_owned(),
        reason: e.to_string(),
    };
    let dir = data_dir.join(PINS_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| io("creating the pins directory", e))?;
    let text = format!(
        "# {component} is pinned to revision {:?} by {by}. This file overrides the\n\
         # component's spec in the agent config for as long as that spec is unchanged;\n\
         # delete it (and reload) to run the file's spec again.\n{}",
        pin.revision,
        toml::to_string(pin).map_err(|e| RollbackError::Io {
            what: "encoding the pin".into(),
            reason: e.to_string(),
        })?
    );
    let tmp = dir.join(format!(".{component}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| io("writing the pin", e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io("syncing the pin", e))?;
    std::fs::rename(&tmp, pin_path(data_dir, component)).map_err(|e| io("placing the pin", e))
}

/// The file's config with `pins` applied in place of the components' own tables.
fn overlay(
    path: &Path,
    file_text: &str,
    pins: &BTreeMap<String, Pin>,
) -> Result<Config, ConfigErrors> {
    let mut root: toml::Table = match file_text.parse() {
        Ok(root) => root,
        Err(_) => return Config::parse(path, file_text.as_bytes()),
    };
    if let Some(toml::Value::Array(items)) = root.get_mut("component") {
        for item in items.iter_mut() {
            let name = item
                .as_table()
                .and_then(|t| t.get("name"))
                .and_then(|n| n.as_str())
                .map(str::to_owned);
            if let Some(pin) = name.and_then(|n| pins.get(&n)) {
                *item = toml::Value::Table(pin.spec.clone());
            }
        }
    }
    let text = toml::to_string(&root).unwrap_or_else(|_| file_text.to_owned());
    Config::parse(path, text.as_bytes())
}

/// Loads `path` as `run` uses it ([`Config::load_checked`]) and overlays the rollback pins under its data dir: a pin whose file spec
/// changed since the rollback is removed (the file wins). Returns the config and a note
/// per pin applied or dropped.
pub fn load_effective(path: &Path) -> Result<(Config, Vec<String>), ConfigErrors> {
    let file = Config::load_checked(path)?;
    let dir = file.agent.data_dir.join(PINS_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok((file, Vec::new()));
    };
    let file_text = std::fs::read_to_string(path).unwrap_or_default();
    let tables = component_tables(&file_text);
    let mut pins = BTreeMap::new();
    let mut notes = Vec::new();
    for entry in entries.flatten() {
        let pin_file = entry.path();
        let Some(component) = pin_file
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".toml"))
            .filter(|n| !n.starts_with('.'))
            .map(str::to_owned)
        else {
            continue;
        };
        let pin: Option<Pin> = std::fs::read_to_string(&pin_file)
            .ok()
            .and_then(|t| toml::from_str(&t).ok());
        let file_spec = tables
            .get(&component)
            .and_then(|t| toml::to_string(t).ok())
            .map(|s| sha256(&s));
        match pin {
            Some(pin) if file_spec.as_deref() == Some(pin.file_spec.as_str()) => {
                notes.push(format!(
                    "{component} pinned to revision {} by a rollback or deployment",
                    pin.revision
                ));
                pins.insert(component, pin);
            }
            Some(_) => {
                notes.push(format!(
                    "{component}: the config file changed its spec since the rollback; the file's spec runs, pin removed"
                ));
                let _ = std::fs::remove_file(&pin_file);
            }
            None => {
                notes.push(format!(
                    "{component}: unreadable pin {} removed",
                    pin_file.display()
                ));
                let _ = std::fs::remove_file(&pin_file);
            }
        }
    }
    if pins.is_empty() {
        return Ok((file, notes));
    }
    match overlay(path, &file_text, &pins) {
        Ok(config) => Ok((config, notes)),
        Err(errors) => {
            notes.push(format!(
                "the pinned specs do not validate, running the file's: {errors}"
            ));
            Ok((file, notes))
        }
    }
}
