//! Profile switches (`SwitchProfile`): the host runs another profile of its config file.
//!
//! A switch is kept in `<data_dir>/profile.toml` with the profile the file named at the
//! time, and overlaid on the file config at start and reload ([`load_effective`]) while
//! the file still names that profile: editing the file's `agent.profile` wins and removes
//! the switch (as a rollback pin gives way to a changed file spec).

use crate::config::{Config, ConfigErrors};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The switch file under the data dir.
pub const PROFILE_FILE: &str = "profile.toml";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Switch {
    /// The profile switched to.
    profile: String,
    /// `agent.profile` in the file when the switch was made.
    file_profile: String,
}

fn switch_path(config: &Config) -> PathBuf {
    config.agent.data_dir.join(PROFILE_FILE)
}

/// The profiles `config` defines: every profile a component lists, and the file's own.
pub fn known_profiles(config: &Config) -> BTreeSet<String> {
    config
        .components
        .iter()
        .flat_map(|c| c.profiles.iter().cloned())
        .chain(std::iter::once(config.agent.profile.clone()))
        .collect()
}

/// `config` running `profile` instead (pure). An unknown profile is refused with the
/// known ones.
pub fn switched(config: &Config, profile: &str) -> Result<Config, String> {
    let known = known_profiles(config);
    if !known.contains(profile) {
        return Err(format!(
            "unknown profile `{profile}`: the config defines {}",
            known
                .iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let mut new = config.clone();
    new.agent.profile = profile.to_owned();
    Ok(new)
}

/// The profile the file names, for the running (effective) `config`: a recorded
/// switch's `file_profile`, else the running profile itself.
pub fn file_profile(config: &Config) -> String {
    std::fs::read_to_string(switch_path(config))
        .ok()
        .and_then(|t| toml::from_str::<Switch>(&t).ok())
        .map_or_else(|| config.agent.profile.clone(), |s| s.file_profile)
}

/// Records the switch to `profile`; `file_profile` is what the file names now. A switch
/// back to the file's profile removes the record.
pub fn save(config: &Config, profile: &str, file_profile: &str) -> std::io::Result<()> {
    let path = switch_path(config);
    if profile == file_profile {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let text = toml::to_string(&Switch {
        profile: profile.to_owned(),
        file_profile: file_profile.to_owned(),
    })
    .map_err(std::io::Error::other)?;
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)
}

/// Overlays a recorded switch on `file` (the config as the file says, with pins):
/// returns the config to run and a note when a switch was applied or dropped.
pub fn overlay(file: Config) -> (Config, Option<String>) {
    let path = switch_path(&file);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return (file, None);
    };
    let drop_it = |why: String| {
        let _ = std::fs::remove_file(&path);
        Some(why)
    };
    match toml::from_str::<Switch>(&text) {
        Ok(s) if s.file_profile == file.agent.profile => match switched(&file, &s.profile) {
            Ok(config) => (
                config,
                Some(format!(
                    "profile `{}` runs (switched by a command; the file says `{}`)",
                    s.profile, s.file_profile
                )),
            ),
            Err(why) => {
                let note = drop_it(format!("profile switch dropped: {why}"));
                (file, note)
            }
        },
        Ok(s) => {
            let note = drop_it(format!(
                "profile switch to `{}` dropped: the file's profile changed from `{}` to `{}`",
                s.profile, s.file_profile, file.agent.profile
            ));
            (file, note)
        }
        Err(e) => {
            let note = drop_it(format!(
                "unreadable profile switch {} removed: {e}",
                path.display()
            ));
            (file, note)
        }
    }
}

/// [`crate::revisions::load_effective`] (the file and its rollback pins), then a
/// recorded profile switch.
pub fn load_effective(path: &Path) -> Result<(Config, Vec<String>), ConfigErrors> {
    let (config, mut notes) = crate::revisions::load_effective(path)?;
    let (config, note) = overlay(config);
    notes.extend(note);
    Ok((config, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, profile: &str) -> Config {
        let text = format!(
            "[agent]\nprofile = \"{profile}\"\ndata_dir = \"{}\"\n\n\
             [[component]]\nname = \"a\"\ncommand = \"true\"\nprofiles = [\"core\"]\n\n\
             [[component]]\nname = \"b\"\ncommand = \"true\"\nprofiles = [\"vision\"]\n",
            dir.display()
        );
        Config::parse(&dir.join("agent.toml"), text.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_switch_to_a_defined_profile_holds_until_the_file_changes_its_profile() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = config(dir.path(), "core");
        let err = switched(&file, "gaming").err().unwrap_or_default();
        assert!(err.contains("unknown profile `gaming`"), "{err}");
        assert!(err.contains("`vision`"), "{err}");

        let vision = switched(&file, "vision").unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = vision
            .active_components()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["b"]);
        save(&file, "vision", "core").unwrap_or_else(|e| panic!("{e}"));
        let (again, note) = overlay(config(dir.path(), "core"));
        assert_eq!(again.agent.profile, "vision", "{note:?}");

        // The file's profile changed since: the file wins, the switch is gone.
        let (edited, note) = overlay(config(dir.path(), "gpu"));
        assert_eq!(edited.agent.profile, "gpu");
        assert!(note.unwrap_or_default().contains("dropped"));
        assert!(!dir.path().join(PROFILE_FILE).exists());

        // Switching back to the file's profile removes the record.
        save(&file, "vision", "core").unwrap_or_else(|e| panic!("{e}"));
        save(&file, "core", "core").unwrap_or_else(|e| panic!("{e}"));
        assert!(!dir.path().join(PROFILE_FILE).exists());
    }
}
