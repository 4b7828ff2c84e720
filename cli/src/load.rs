//! Loading the binary's configuration: the profile's defaults, the TOML
//! file, `DATABASE_URL` and `CONSIGN_*` variables (figment).

use std::{collections::BTreeMap, path::Path};

use consign_relay::{Config, Profile};
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};

use crate::error::{Error, Result};

#[cfg(test)]
mod tests;

/// Reads the profile's defaults, then `file`, then the environment. The
/// profile is `profile` if given, else the one named in the file or
/// `CONSIGN_PROFILE`, else production. Does not validate: each command
/// checks what it needs ([`Config::validate`],
/// [`DatabaseSettings::validate`]).
///
/// # Errors
/// [`Error::ConfigSource`] if the file is missing or unreadable,
/// [`Error::Config`] naming a field of the wrong type, an unknown field
/// or an unknown profile.
pub(crate) fn load(file: Option<&Path>, profile: Option<Profile>) -> Result<Config> {
    load_from(sources(file, true)?, profile)
}

fn load_from(sources: Figment, profile: Option<Profile>) -> Result<Config> {
    let profile = match profile {
        Some(profile) => profile,
        None => match sources.find_value("profile") {
            Ok(value) => match value.as_str() {
                Some(name) => name.parse::<Profile>()?,
                None => {
                    return Err(consign_relay::Error::config(
                        "profile",
                        "must be a string: development, testing or production",
                    )
                    .into());
                }
            },
            Err(_) => Profile::default(),
        },
    };
    Figment::from(Serialized::defaults(Config::for_profile(profile)))
        .merge(sources)
        .merge(Serialized::default("profile", profile))
        .extract()
        .map_err(|e| figment_error(&e))
}

/// The file and (if `env`) the environment, without defaults.
fn sources(file: Option<&Path>, env: bool) -> Result<Figment> {
    let mut figment = Figment::new();
    if let Some(file) = file {
        if !file.is_file() {
            return Err(Error::Source(format!(
                "configuration file {} does not exist",
                file.display()
            )));
        }
        figment = figment.merge(Toml::file_exact(file));
    }
    if !env {
        return Ok(figment);
    }
    let figment = figment
        .merge(
            Env::raw()
                .only(&["DATABASE_URL"])
                .map(|_| "database.url".into()),
        )
        .merge(
            // Keys arrive in their original case: compare uncased.
            // CONSIGN_CONFIG names the file (read by the CLI), and
            // `[kafka]` keys contain dots, which figment would nest.
            Env::prefixed("CONSIGN_")
                .filter(|key| !key.eq("config") && !is_kafka_env(key.as_str()))
                .split("__")
                .map(|key| env_key(key.as_str()).into()),
        );
    let kafka =
        kafka_from_env(std::env::vars_os().filter_map(|(name, value)| {
            Some((name.into_string().ok()?, value.into_string().ok()?))
        }));
    Ok(if kafka.is_empty() {
        figment
    } else {
        figment.merge(Serialized::default("kafka", kafka))
    })
}

/// The effective configuration as TOML, secrets redacted.
pub(crate) fn to_redacted_toml(config: &Config) -> String {
    toml::to_string(&config.redacted()).expect("the configuration serializes to TOML")
}

/// `RELAY.BATCH_SIZE` -> `relay.batch-size`.
fn env_key(key: &str) -> String {
    key.to_ascii_lowercase().replace('_', "-")
}

const KAFKA_ENV: &str = "KAFKA__";

fn is_kafka_env(key: &str) -> bool {
    key.get(..KAFKA_ENV.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(KAFKA_ENV))
}

/// The `[kafka]` entries of `CONSIGN_KAFKA__<PROPERTY>` variables, `_` in the
/// property standing for `.`: `CONSIGN_KAFKA__BOOTSTRAP_SERVERS` ->
/// `bootstrap.servers`. Values stay strings, as librdkafka takes them.
fn kafka_from_env(vars: impl Iterator<Item = (String, String)>) -> BTreeMap<String, String> {
    vars.filter_map(|(name, value)| {
        let key = name
            .get(..8)
            .filter(|head| head.eq_ignore_ascii_case("CONSIGN_"))
            .and_then(|_| name.get(8..))?;
        is_kafka_env(key).then(|| {
            let property = &key[KAFKA_ENV.len()..];
            (property.to_ascii_lowercase().replace('_', "."), value)
        })
    })
    .collect()
}

fn figment_error(error: &figment::Error) -> Error {
    let field = error.path.join(".");
    let source = error
        .metadata
        .as_ref()
        .map(|m| match &m.source {
            Some(source) => format!(" (from {source})"),
            None => format!(" (from {})", m.name),
        })
        .unwrap_or_default();
    if field.is_empty() {
        Error::Source(format!("{}{source}", error.kind))
    } else {
        consign_relay::Error::config(field, format!("{}{source}", error.kind)).into()
    }
}
