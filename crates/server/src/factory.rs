//! How the repository turns a model folder into runners: architecture name -> builder.
//!
//! ```
//! use aperture_server::{ArchitectureRegistry, ModelContext};
//! let mut reg = ArchitectureRegistry::with_builtins();
//! reg.register("my_identity", |ctx: &ModelContext| {
//!     ArchitectureRegistry::with_builtins().build("identity", ctx)
//! });
//! assert!(reg.architectures().contains(&"my_identity".to_string()));
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aperture_engine::{DType, Precision, Runner};

use crate::builtin::{AddSubRunner, IdentityRunner};
use crate::config::ModelConfig;
use crate::image::{ImageAdapter, PlanarImageAdapter};

/// Error a builder returns (anything that converts, e.g. `anyhow::Error` via `.into()`).
pub type BuildError = Box<dyn std::error::Error + Send + Sync>;

/// What a builder gets to create one instance of a model version.
pub struct ModelContext<'a> {
    pub name: &'a str,
    pub version: u64,
    /// The numeric version folder (or the model folder for unversioned models).
    pub version_dir: &'a Path,
    pub config: &'a ModelConfig,
    /// Instance index within the instance group.
    pub instance: usize,
    /// GPU this instance should run on, if the instance group names GPUs.
    pub gpu: Option<i32>,
}

impl ModelContext<'_> {
    /// The weights file resolved against the version folder, if the config names one.
    pub fn weights_path(&self) -> Option<std::path::PathBuf> {
        self.config
            .weights
            .as_ref()
            .map(|w| self.version_dir.join(w))
    }

    /// Precision from config (default fp32).
    pub fn precision(&self) -> Result<Precision, BuildError> {
        match &self.config.precision {
            None => Ok(Precision::Fp32),
            Some(p) => p.parse::<Precision>().map_err(Into::into),
        }
    }
}

/// Builds runners for model versions; the server calls it once per instance.
pub trait RunnerFactory: Send + Sync {
    fn create(&self, ctx: &ModelContext) -> Result<Arc<dyn Runner>, BuildError>;

    /// Image pre/post-processing for the `/v1` image endpoints, if the architecture has it.
    fn image_adapter(&self, _architecture: &str) -> Option<Arc<dyn ImageAdapter>> {
        None
    }
}

type Builder = Box<dyn Fn(&ModelContext) -> Result<Arc<dyn Runner>, BuildError> + Send + Sync>;

/// Maps `architecture` from config.toml to a builder. Starts with the built-in
/// `identity` and `add_sub`; real models register themselves on top.
pub struct ArchitectureRegistry {
    builders: BTreeMap<String, Builder>,
    images: BTreeMap<String, Arc<dyn ImageAdapter>>,
}

impl ArchitectureRegistry {
    pub fn empty() -> Self {
        Self {
            builders: BTreeMap::new(),
            images: BTreeMap::new(),
        }
    }

    pub fn with_builtins() -> Self {
        let mut r = Self::empty();
        r.register("identity", build_identity);
        r.register("add_sub", build_add_sub);
        r.register_image_adapter("identity", Arc::new(PlanarImageAdapter::new()));
        r
    }

    /// Adds (or replaces) the image pre/post-processing of `architecture`.
    pub fn register_image_adapter(
        &mut self,
        architecture: &str,
        adapter: Arc<dyn ImageAdapter>,
    ) -> &mut Self {
        self.images.insert(architecture.to_string(), adapter);
        self
    }

    /// Adds (or replaces) the builder for `architecture`.
    pub fn register<F>(&mut self, architecture: &str, builder: F) -> &mut Self
    where
        F: Fn(&ModelContext) -> Result<Arc<dyn Runner>, BuildError> + Send + Sync + 'static,
    {
        self.builders
            .insert(architecture.to_string(), Box::new(builder));
        self
    }

    pub fn architectures(&self) -> Vec<String> {
        self.builders.keys().cloned().collect()
    }

    pub fn build(
        &self,
        architecture: &str,
        ctx: &ModelContext,
    ) -> Result<Arc<dyn Runner>, BuildError> {
        let b = self.builders.get(architecture).ok_or_else(|| {
            format!(
                "unknown architecture '{architecture}' (known: {})",
                self.architectures().join(", ")
            )
        })?;
        b(ctx)
    }
}

impl RunnerFactory for ArchitectureRegistry {
    fn create(&self, ctx: &ModelContext) -> Result<Arc<dyn Runner>, BuildError> {
        self.build(&ctx.config.architecture, ctx)
    }

    fn image_adapter(&self, architecture: &str) -> Option<Arc<dyn ImageAdapter>> {
        self.images.get(architecture).cloned()
    }
}

fn dims_and_delay(ctx: &ModelContext) -> Result<(Vec<i64>, Duration), BuildError> {
    let dims = ctx.config.input_size.clone().unwrap_or_else(|| vec![16]);
    let delay = ctx.config.int_param("delay_us").unwrap_or(0);
    let delay = u64::try_from(delay).map_err(|_| format!("delay_us must be >= 0, got {delay}"))?;
    Ok((dims, Duration::from_micros(delay)))
}

fn build_identity(ctx: &ModelContext) -> Result<Arc<dyn Runner>, BuildError> {
    let (dims, delay) = dims_and_delay(ctx)?;
    let dtype = match ctx.precision()? {
        Precision::Fp16 => DType::F16,
        Precision::Bf16 => DType::BF16,
        _ => DType::F32,
    };
    Ok(Arc::new(IdentityRunner::new(dims, dtype, delay)))
}

fn build_add_sub(ctx: &ModelContext) -> Result<Arc<dyn Runner>, BuildError> {
    let (dims, delay) = dims_and_delay(ctx)?;
    Ok(Arc::new(AddSubRunner::new(dims, delay)))
}
