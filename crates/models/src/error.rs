use std::fmt;

use aperture_engine::EngineError;
use aperture_weights::WeightsError;
use thiserror::Error;

/// One problem found while matching a checkpoint against a model's parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightIssue {
    Missing {
        name: String,
        expected: Vec<usize>,
    },
    Unexpected {
        name: String,
        found: Vec<usize>,
    },
    WrongShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
}

impl fmt::Display for WeightIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightIssue::Missing { name, expected } => {
                write!(f, "missing      {name} (expected shape {expected:?})")
            }
            WeightIssue::Unexpected { name, found } => {
                write!(f, "unexpected   {name} (shape {found:?})")
            }
            WeightIssue::WrongShape {
                name,
                expected,
                found,
            } => {
                write!(
                    f,
                    "wrong shape  {name}: expected {expected:?}, found {found:?}"
                )
            }
        }
    }
}

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("{}", format_issues(.model, .issues))]
    WeightMismatch {
        model: String,
        issues: Vec<WeightIssue>,
    },
    #[error("{0}")]
    Input(String),
}

fn format_issues(model: &str, issues: &[WeightIssue]) -> String {
    let mut s = format!(
        "the weights do not match the {model} model ({} problems):",
        issues.len()
    );
    for i in issues {
        s.push_str("\n  ");
        s.push_str(&i.to_string());
    }
    s
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// Model errors reaching a [`aperture_engine::Runner`] caller keep their engine kind
/// (e.g. out of memory); the others become invalid-argument errors with their message.
impl From<ModelError> for EngineError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Engine(e) => e,
            other => EngineError::Invalid(other.to_string()),
        }
    }
}
