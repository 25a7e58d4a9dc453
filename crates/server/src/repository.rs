//! The model repository: discovers model folders, loads the selected versions,
//! and loads / unloads / reloads models at run time without touching the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::config::ModelConfig;
use crate::error::{Result, ServerError};
use crate::factory::RunnerFactory;
use crate::model::LoadedModel;

/// Where a model's config and versions come from.
#[derive(Clone, Debug)]
pub enum ModelSource {
    /// A folder with `config.toml` and numeric version subfolders (or none: version 1).
    Folder(PathBuf),
    /// A config given in code (e.g. `--model weights.safetensors`), files resolved in `dir`.
    Inline {
        config: Box<ModelConfig>,
        dir: PathBuf,
    },
}

/// One row of the repository index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: String,
    pub reason: String,
}

#[derive(Default)]
struct Entry {
    versions: BTreeMap<u64, Arc<LoadedModel>>,
    reason: String,
    /// A load is under way (the index says LOADING while no version is ready).
    loading: bool,
}

/// Marks a model as loading for as long as it lives.
struct LoadingMark<'a> {
    models: &'a RwLock<BTreeMap<String, Entry>>,
    name: String,
}

impl<'a> LoadingMark<'a> {
    fn new(models: &'a RwLock<BTreeMap<String, Entry>>, name: &str) -> Self {
        write(models).entry(name.to_string()).or_default().loading = true;
        Self {
            models,
            name: name.to_string(),
        }
    }
}

impl Drop for LoadingMark<'_> {
    fn drop(&mut self) {
        if let Some(e) = write(self.models).get_mut(&self.name) {
            e.loading = false;
        }
    }
}

pub struct Repository {
    root: Option<PathBuf>,
    sources: RwLock<BTreeMap<String, ModelSource>>,
    factory: Arc<dyn RunnerFactory>,
    models: RwLock<BTreeMap<String, Entry>>,
    /// Serialises load/unload; inference never takes it.
    control: tokio::sync::Mutex<()>,
}

impl Repository {
    pub fn new(root: Option<PathBuf>, factory: Arc<dyn RunnerFactory>) -> Self {
        Self {
            root,
            sources: RwLock::new(BTreeMap::new()),
            factory,
            models: RwLock::new(BTreeMap::new()),
            control: tokio::sync::Mutex::new(()),
        }
    }

    /// Registers a model outside the repository folder (served under `name`).
    pub fn add_source(&self, name: &str, source: ModelSource) {
        write(&self.sources).insert(name.to_string(), source);
    }

    /// Model folders found now: explicit sources plus `root/*/config.toml`.
    pub fn discover(&self) -> BTreeMap<String, ModelSource> {
        let mut found = read(&self.sources).clone();
        if let Some(root) = &self.root {
            if let Ok(entries) = std::fs::read_dir(root) {
                for e in entries.flatten() {
                    let path = e.path();
                    if path.join("config.toml").is_file() {
                        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                            found
                                .entry(name.to_string())
                                .or_insert(ModelSource::Folder(path.clone()));
                        }
                    }
                }
            }
        }
        found
    }

    /// Loads every discovered model; returns the failures (the others still serve).
    pub async fn load_all(&self) -> Vec<(String, ServerError)> {
        let mut failures = Vec::new();
        for name in self.discover().into_keys() {
            if let Err(e) = self.load(&name).await {
                tracing::error!(model = %name, error = %e, "model failed to load");
                failures.push((name, e));
            }
        }
        failures
    }

    /// Loads (or reloads) a model: the new versions replace the old ones atomically.
    pub async fn load(&self, name: &str) -> Result<()> {
        let _guard = self.control.lock().await;
        let source = self.discover().remove(name).ok_or_else(|| {
            ServerError::invalid(format!(
                "failed to load '{name}': no such model in the repository"
            ))
        })?;
        let (config, base) = match &source {
            ModelSource::Folder(dir) => (ModelConfig::load(&dir.join("config.toml"))?, dir.clone()),
            ModelSource::Inline { config, dir } => ((**config).clone(), dir.clone()),
        };
        let versions = select_versions(&base, &config)?;
        let _loading = LoadingMark::new(&self.models, name);
        let mut loaded = BTreeMap::new();
        for (version, dir) in versions {
            let factory = self.factory.clone();
            let (n, c) = (name.to_string(), config.clone());
            let built = tokio::task::spawn_blocking(move || {
                LoadedModel::build_runners(&n, version, &dir, &c, factory.as_ref())
            })
            .await
            .map_err(|e| ServerError::Internal(format!("loading '{name}' panicked: {e}")))?;
            let built = match built {
                Ok(b) => b,
                Err(e) => {
                    write(&self.models)
                        .entry(name.to_string())
                        .or_default()
                        .reason = e.to_string();
                    return Err(e);
                }
            };
            let model = LoadedModel::start(name, version, config.clone(), built)?;
            loaded.insert(version, Arc::new(model));
        }
        tracing::info!(model = %name, versions = ?loaded.keys().collect::<Vec<_>>(), "model loaded");
        write(&self.models).insert(
            name.to_string(),
            Entry {
                versions: loaded,
                reason: String::new(),
                loading: false,
            },
        );
        Ok(())
    }

    /// Unloads a model; requests already running finish on the old instance.
    pub async fn unload(&self, name: &str) -> Result<()> {
        let _guard = self.control.lock().await;
        let mut models = write(&self.models);
        match models.get_mut(name) {
            Some(e) if !e.versions.is_empty() => {
                e.versions.clear();
                e.reason = "unloaded".into();
                tracing::info!(model = %name, "model unloaded");
                Ok(())
            }
            _ => {
                if self.discover().contains_key(name) {
                    Ok(())
                } else {
                    Err(ServerError::invalid(format!(
                        "failed to unload '{name}': no such model"
                    )))
                }
            }
        }
    }

    /// The model version to serve: the given one, or the highest loaded.
    pub fn get(&self, name: &str, version: Option<&str>) -> Result<Arc<LoadedModel>> {
        let models = read(&self.models);
        let entry = match models.get(name) {
            Some(e) if !e.versions.is_empty() => e,
            Some(e) if e.loading => {
                return Err(ServerError::Unavailable(format!(
                    "model '{name}' is loading; it serves once /v2/models/{name}/ready answers 200"
                )))
            }
            _ => {
                return Err(ServerError::NotFound(format!(
                    "Request for unknown model: '{name}' is not found"
                )))
            }
        };
        match version.filter(|v| !v.is_empty()) {
            None => entry.versions.values().next_back().cloned().ok_or_else(|| {
                ServerError::NotFound(format!(
                    "Request for unknown model: '{name}' has no ready version"
                ))
            }),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .and_then(|n| entry.versions.get(&n).cloned())
                .ok_or_else(|| {
                    ServerError::NotFound(format!(
                        "Request for unknown model: '{name}' version {v} is not found"
                    ))
                }),
        }
    }

    /// Every ready model version (statistics, metrics).
    pub fn loaded(&self) -> Vec<Arc<LoadedModel>> {
        read(&self.models)
            .values()
            .flat_map(|e| e.versions.values().cloned())
            .collect()
    }

    /// Versions of a loaded model, ascending.
    pub fn versions(&self, name: &str) -> Vec<u64> {
        read(&self.models)
            .get(name)
            .map(|e| e.versions.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Triton's repository index: ready versions, then known but unloaded models.
    pub fn index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let models = read(&self.models);
        let mut out = Vec::new();
        for name in self.discover().into_keys() {
            match models.get(&name) {
                Some(e) if !e.versions.is_empty() => {
                    out.extend(e.versions.keys().map(|v| IndexEntry {
                        name: name.clone(),
                        version: v.to_string(),
                        state: "READY".into(),
                        reason: String::new(),
                    }))
                }
                Some(e) if e.loading && !ready_only => out.push(IndexEntry {
                    name: name.clone(),
                    version: String::new(),
                    state: "LOADING".into(),
                    reason: String::new(),
                }),
                other if !ready_only => out.push(IndexEntry {
                    name: name.clone(),
                    version: String::new(),
                    state: "UNAVAILABLE".into(),
                    reason: other
                        .map(|e| e.reason.clone())
                        .unwrap_or_else(|| "not loaded".into()),
                }),
                _ => {}
            }
        }
        out
    }
}

/// Numeric version folders chosen by the policy; a folder without any is version 1.
fn select_versions(base: &Path, config: &ModelConfig) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(base) {
        for e in entries.flatten() {
            let path = e.path();
            let num = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u64>().ok());
            if let (Some(v), true) = (num, path.is_dir()) {
                found.insert(v, path);
            }
        }
    }
    if found.is_empty() {
        return Ok(vec![(1, base.to_path_buf())]);
    }
    let available: Vec<u64> = found.keys().copied().collect();
    let chosen = config.version_policy.select(&available);
    if chosen.is_empty() {
        return Err(ServerError::invalid(format!(
            "{}: version policy {:?} selects none of the versions {available:?}",
            base.display(),
            config.version_policy
        )));
    }
    Ok(chosen
        .into_iter()
        .filter_map(|v| found.remove(&v).map(|p| (v, p)))
        .collect())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}
