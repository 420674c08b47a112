//! Which service, metric and target a KEDA call is about, from the ScaledObjectRef: the
//! `service` metadata key (else the ScaledObject's name), `metric` (`concurrency` or `rate`),
//! and `targetValue`, each falling back to the service's config.

use std::collections::HashMap;

use tonic::Status;

use super::proto::ScaledObjectRef;
use crate::config::{ScalingMetric, Service, DEFAULT_TARGET_CONCURRENCY, DEFAULT_TARGET_RATE};

/// Metadata key naming the Reveille service.
pub const META_SERVICE: &str = "service";
/// Metadata key choosing the metric (`concurrency` or `rate`).
pub const META_METRIC: &str = "metric";
/// Metadata key with the target value per replica.
pub const META_TARGET: &str = "targetValue";

/// A service's configured KEDA defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServiceTargets {
    /// The metric when the metadata does not choose one.
    pub metric: ScalingMetric,
    /// The configured target, if any.
    pub target: Option<f64>,
    /// The per-endpoint concurrency limit (the concurrency metric's default target).
    pub concurrency: Option<usize>,
}

impl From<&Service> for ServiceTargets {
    fn from(s: &Service) -> Self {
        ServiceTargets {
            metric: s.keda.metric,
            target: s.keda.target,
            concurrency: s.concurrency,
        }
    }
}

/// What a call resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The Reveille service.
    pub service: String,
    /// The metric.
    pub metric: ScalingMetric,
    /// Target value per replica.
    pub target: f64,
}

impl Resolved {
    /// The metric's name in KEDA (`reveille-<service>-<metric>`).
    pub fn metric_name(&self) -> String {
        format!("reveille-{}-{}", self.service, self.metric.as_str())
    }
}

/// Why a call could not be resolved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ResolveError {
    /// Neither metadata nor the ScaledObject's name names a service.
    #[error(
        "no service named: set scalerMetadata.service (or name the ScaledObject after the service)"
    )]
    NoService,
    /// The named service is not configured on this Reveille.
    #[error("service {0:?} is not configured in Reveille (scalerMetadata.service, else the ScaledObject's name)")]
    UnknownService(String),
    /// A metadata value is invalid.
    #[error("scalerMetadata.{key}: {reason}")]
    BadMetadata {
        /// The key.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

impl From<ResolveError> for Status {
    fn from(e: ResolveError) -> Status {
        match e {
            ResolveError::UnknownService(_) => Status::not_found(e.to_string()),
            ResolveError::NoService | ResolveError::BadMetadata { .. } => {
                Status::invalid_argument(e.to_string())
            }
        }
    }
}

/// Resolves a ScaledObjectRef against the configured services.
pub fn resolve(
    r: &ScaledObjectRef,
    services: &HashMap<String, ServiceTargets>,
) -> Result<Resolved, ResolveError> {
    let meta = &r.scaler_metadata;
    let service = match meta.get(META_SERVICE).map(|s| s.trim()) {
        Some(s) if !s.is_empty() => s.to_string(),
        _ if !r.name.is_empty() => r.name.clone(),
        _ => return Err(ResolveError::NoService),
    };
    let cfg = services
        .get(&service)
        .ok_or_else(|| ResolveError::UnknownService(service.clone()))?;
    let metric = match meta.get(META_METRIC).map(|s| s.trim()) {
        None | Some("") => cfg.metric,
        Some("concurrency") => ScalingMetric::Concurrency,
        Some("rate") => ScalingMetric::Rate,
        Some(other) => {
            return Err(ResolveError::BadMetadata {
                key: META_METRIC,
                reason: format!("{other:?} is not one of \"concurrency\", \"rate\""),
            })
        }
    };
    let target = match meta.get(META_TARGET).map(|s| s.trim()) {
        Some(v) if !v.is_empty() => match v.parse::<f64>() {
            Ok(t) if t.is_finite() && t > 0.0 => t,
            _ => {
                return Err(ResolveError::BadMetadata {
                    key: META_TARGET,
                    reason: format!("{v:?} is not a number greater than 0"),
                })
            }
        },
        _ => match (cfg.target, metric) {
            (Some(t), _) => t,
            (None, ScalingMetric::Concurrency) => cfg
                .concurrency
                .map_or(DEFAULT_TARGET_CONCURRENCY, |c| c as f64),
            (None, ScalingMetric::Rate) => DEFAULT_TARGET_RATE,
        },
    };
    Ok(Resolved {
        service,
        metric,
        target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> HashMap<String, ServiceTargets> {
        let mut m = HashMap::new();
        m.insert(
            "hello".to_string(),
            ServiceTargets {
                metric: ScalingMetric::Concurrency,
                target: None,
                concurrency: Some(4),
            },
        );
        m.insert(
            "api".to_string(),
            ServiceTargets {
                metric: ScalingMetric::Rate,
                target: Some(7.5),
                concurrency: None,
            },
        );
        m
    }

    fn sor(name: &str, meta: &[(&str, &str)]) -> ScaledObjectRef {
        ScaledObjectRef {
            name: name.into(),
            namespace: "default".into(),
            scaler_metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn metadata_then_name_then_config() {
        let s = services();
        let r = resolve(&sor("hello", &[]), &s).unwrap();
        assert_eq!((r.metric, r.target), (ScalingMetric::Concurrency, 4.0));
        assert_eq!(r.metric_name(), "reveille-hello-concurrency");
        let r = resolve(&sor("so-name", &[("service", "api")]), &s).unwrap();
        assert_eq!(r.service, "api");
        assert_eq!((r.metric, r.target), (ScalingMetric::Rate, 7.5));
        let r = resolve(
            &sor(
                "x",
                &[
                    ("service", "api"),
                    ("metric", "concurrency"),
                    ("targetValue", "3"),
                ],
            ),
            &s,
        )
        .unwrap();
        assert_eq!((r.metric, r.target), (ScalingMetric::Concurrency, 3.0));
    }

    #[test]
    fn errors_map_to_grpc_codes() {
        let s = services();
        let e = resolve(&sor("nope", &[]), &s).unwrap_err();
        let status = Status::from(e);
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(
            status.message().contains("\"nope\" is not configured"),
            "{status:?}"
        );
        let e = resolve(&sor("", &[]), &s).unwrap_err();
        assert_eq!(Status::from(e).code(), tonic::Code::InvalidArgument);
        let e = resolve(&sor("hello", &[("targetValue", "-2")]), &s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "scalerMetadata.targetValue: \"-2\" is not a number greater than 0"
        );
        let e = resolve(&sor("hello", &[("metric", "cpu")]), &s).unwrap_err();
        assert_eq!(Status::from(e).code(), tonic::Code::InvalidArgument);
    }
}
