//! `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`, as containerd and cri-o set them for
//! Kubernetes pods. Unknown keys are ignored always (the runtimes add `IgnoreUnknown=1`), and
//! so are malformed pairs: a runtime that passes none (podman) still gets a working pod.

/// The pod identity the runtime passed in `CNI_ARGS`; every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    /// The sandbox id; equals `CNI_CONTAINERID` on containerd and cri-o.
    pub infra_container_id: Option<String>,
}

impl CniArgs {
    /// Splits on `;`, then each pair on its first `=`; an empty value counts as absent, and
    /// a repeated key keeps its last value (as the Go `LoadArgs` does).
    pub fn parse(cni_args: &str) -> Self {
        let mut args = Self::default();
        for pair in cni_args.split(';') {
            let Some((key, value)) = pair.split_once('=') else {
                continue;
            };
            let slot = match key {
                "K8S_POD_NAMESPACE" => &mut args.pod_namespace,
                "K8S_POD_NAME" => &mut args.pod_name,
                "K8S_POD_UID" => &mut args.pod_uid,
                "K8S_POD_INFRA_CONTAINER_ID" => &mut args.infra_container_id,
                _ => continue,
            };
            *slot = (!value.is_empty()).then(|| value.to_owned());
        }
        args
    }

    /// `namespace/name`, when the runtime told us both.
    pub fn pod_ref(&self) -> Option<String> {
        match (&self.pod_namespace, &self.pod_name) {
            (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn containerd_args() {
        let args = CniArgs::parse(
            "K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=5f0c-1;IgnoreUnknown=1;K8S_POD_NAMESPACE=rgapi;K8S_POD_NAME=api-0",
        );
        assert_eq!(
            args,
            CniArgs {
                pod_namespace: Some("rgapi".into()),
                pod_name: Some("api-0".into()),
                pod_uid: Some("5f0c-1".into()),
                infra_container_id: Some("abc123".into()),
            }
        );
        assert_eq!(args.pod_ref().as_deref(), Some("rgapi/api-0"));
    }

    #[test]
    fn splits_on_first_equals_only() {
        let args = CniArgs::parse("K8S_POD_NAME=a=b;K8S_POD_NAMESPACE==x");
        assert_eq!(args.pod_name.as_deref(), Some("a=b"));
        assert_eq!(args.pod_namespace.as_deref(), Some("=x"));
    }

    #[test]
    fn ignores_malformed_unknown_and_empty() {
        let args =
            CniArgs::parse(";;garbage;K8S_POD_NAME;=v;FOO=bar;K8S_POD_NAMESPACE=;K8S_POD_UID=u");
        assert_eq!(
            args,
            CniArgs {
                pod_uid: Some("u".into()),
                ..CniArgs::default()
            }
        );
        assert_eq!(args.pod_ref(), None);
        assert_eq!(CniArgs::parse(""), CniArgs::default());
    }

    #[test]
    fn last_value_wins() {
        let args = CniArgs::parse("K8S_POD_NAME=a;K8S_POD_NAME=b");
        assert_eq!(args.pod_name.as_deref(), Some("b"));
    }

    proptest! {
        #[test]
        fn never_panics(s in any::<String>()) {
            let _ = CniArgs::parse(&s).pod_ref();
        }

        #[test]
        fn never_panics_on_pairs(pairs in proptest::collection::vec(("[A-Z_=;]{0,12}", ".{0,12}"), 0..8)) {
            let joined: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = CniArgs::parse(&joined.join(";"));
        }
    }
}
