//! A whole simulated node for end-to-end tests: the node netns with its API server, the cloud
//! netns with the mock IMDS (`169.254.169.254:80`) and the mock Entra ID
//! (`https://login.mock.test`, by name through the node's hosts file, TLS with a test CA), an
//! in-process podid-controller, a real podid-tokend, and the CNI chain `[bridge, podid]` at
//! cniVersion 0.3.0 as AKS ships it.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use kube::Api;
use kube::api::ListParams;
use podid_api::crd::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, assignment_state,
};
use podid_controller::lease::{LeaseSettings, LeaseTimings};
use podid_controller::{Controller, Settings};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cloud::{CLOUD_SIDE, Cloud};
use crate::mocks::entra::{App, EntraMock};
use crate::mocks::imds::{ImdsMock, InstanceMetadata, ManagedIdentity};
use crate::node::{Node, Pod, wait_for};
use crate::objects::{self, PodBuilder};
use crate::runtime::Runtime;

/// The tenant of every identity in the world.
pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
/// The mock Entra ID's name.
pub const ENTRA_HOST: &str = "login.mock.test";

/// One node with everything around it.
#[derive(Debug)]
pub struct World {
    pub imds: ImdsMock,
    pub entra: EntraMock,
    pub vm: InstanceMetadata,
    /// The node's own (system-assigned) identity: only exception pods may get its tokens.
    pub system: ManagedIdentity,
    pub chain: Runtime,
    controller: Option<ControllerTask>,
    pub cloud: Cloud,
    pub node: Node,
}

impl World {
    /// Builds the world and starts the controller and tokend (with `tokend_args` added).
    pub fn new(tag: &str, tokend_args: &[&str]) -> Result<Self> {
        let node = Node::new(tag)?;
        let cloud = Cloud::attach(&node)?;
        let CloudMocks {
            imds,
            entra,
            vm,
            system,
            ca,
        } = CloudMocks::start(&node, &cloud)?;
        let mut args = vec![
            "--authority-host".to_owned(),
            format!("https://{ENTRA_HOST}"),
            "--ca-file".to_owned(),
            ca.display().to_string(),
        ];
        args.extend(tokend_args.iter().map(|a| (*a).to_owned()));
        node.set_tokend_args(&args.iter().map(String::as_str).collect::<Vec<_>>());

        let controller = spawn_controller(&node);
        let chain = node.chain("0.3.0");
        let world = Self {
            imds,
            entra,
            vm,
            system,
            chain,
            controller: Some(controller),
            cloud,
            node,
        };
        world.node.start_tokend()?;
        Ok(world)
    }

    /// A user-assigned managed identity attached to the node pool and its AzureIdentity.
    pub fn user_assigned(&self, namespace: &str, name: &str) -> Result<ManagedIdentity> {
        let id = ManagedIdentity::user_assigned(&self.vm, name);
        self.imds.attach(id.clone());
        self.node.create(
            &objects::identity(namespace, name)
                .user_assigned(&id.client_id, &id.resource_id)
                .build(),
        )?;
        Ok(id)
    }

    /// Registers `app` with Entra ID.
    pub fn register(&self, app: App) -> Result<()> {
        self.entra.register(app)?;
        Ok(())
    }

    pub fn create_identity(&self, identity: AzureIdentity) -> Result<AzureIdentity> {
        self.node.create(&identity)
    }

    /// An AzureIdentityBinding of `identity` to pods labelled `selector`.
    pub fn bind(
        &self,
        namespace: &str,
        name: &str,
        identity: &str,
        selector: &str,
    ) -> Result<AzureIdentityBinding> {
        self.node
            .create(&objects::binding(namespace, name, identity, selector))
    }

    /// A pod scheduled here whose sandbox went through the CNI chain.
    pub fn start_pod(&self, pod: PodBuilder) -> Result<Pod> {
        let pod = self.node.pod_from(pod)?;
        self.chain
            .add(&pod.attachment)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(pod)
    }

    /// Stops the controller (assignments stay as they are until [`start_controller`] runs).
    ///
    /// [`start_controller`]: Self::start_controller
    pub fn stop_controller(&mut self) {
        if let Some((shutdown, task)) = self.controller.take() {
            shutdown.cancel();
            let _ = self.node.block_on(task);
        }
    }

    /// Starts the controller again (after [`stop_controller`](Self::stop_controller)).
    pub fn start_controller(&mut self) {
        if self.controller.is_none() {
            self.controller = Some(spawn_controller(&self.node));
        }
    }

    /// Tears `pod`'s sandbox down through the chain and deletes the Pod from the API, as the
    /// kubelet does when a pod goes away.
    pub fn delete_pod(&self, pod: &Pod) -> Result<()> {
        self.chain
            .del(&pod.attachment)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (namespace, name) = pod_name(pod)?;
        self.node
            .delete::<k8s_openapi::api::core::v1::Pod>(&namespace, &name)
    }

    /// Waits until `pod` has `count` Assigned assignments.
    pub fn wait_assigned(
        &self,
        pod: &Pod,
        namespace: &str,
        count: usize,
    ) -> Result<Vec<AzureAssignedIdentity>> {
        let api: Api<AzureAssignedIdentity> = Api::namespaced(self.node.client(), namespace);
        wait_for(Duration::from_secs(10), "the pod's assignments", || {
            let list = self.node.block_on(api.list(&ListParams::default())).ok()?;
            let mine: Vec<_> = list
                .items
                .into_iter()
                .filter(|a| a.spec.pod_uid.as_deref() == Some(pod.uid.as_str()))
                .filter(|a| {
                    a.status.as_ref().and_then(|s| s.status.as_deref())
                        == Some(assignment_state::ASSIGNED)
                })
                .collect();
            (mine.len() == count).then_some(mine)
        })
        .context("waiting for the controller")
    }
}

/// The mock node IMDS and Entra ID started in `cloud` for `node`, as on Azure: the node's hosts
/// file names Entra ID, whose test CA is written into the node's dir.
#[derive(Debug)]
pub struct CloudMocks {
    pub imds: ImdsMock,
    pub entra: EntraMock,
    pub vm: InstanceMetadata,
    /// The VM's own (system-assigned) identity.
    pub system: ManagedIdentity,
    /// The PEM of the CA Entra ID's certificate chains to (tokend's `--ca-file`).
    pub ca: std::path::PathBuf,
}

impl CloudMocks {
    pub fn start(node: &Node, cloud: &Cloud) -> Result<Self> {
        let vm = InstanceMetadata::default();
        let system = ManagedIdentity::system_assigned(&vm);
        let imds_listener = cloud.listen(Cloud::imds_addr())?;
        let entra_listener = cloud.listen(Cloud::entra_addr())?;
        let (imds, entra) = node.block_on(async {
            let imds = ImdsMock::builder()
                .tenant(TENANT)
                .instance(vm.clone())
                .system_identity(system.clone())
                .start_on(imds_listener)
                .await?;
            let entra = EntraMock::builder()
                .host(ENTRA_HOST)
                .start_on(entra_listener)
                .await?;
            anyhow::Ok((imds, entra))
        })?;
        let ca = node.dir().join("entra-ca.pem");
        entra.write_ca_pem(&ca)?;
        node.set_hosts(&[(ENTRA_HOST, IpAddr::V4(CLOUD_SIDE))])?;
        Ok(Self {
            imds,
            entra,
            vm,
            system,
            ca,
        })
    }
}

type ControllerTask = (
    CancellationToken,
    JoinHandle<Result<(), podid_controller::RunError>>,
);

fn spawn_controller(node: &Node) -> ControllerTask {
    let _guard = node.async_runtime().enter();
    let settings = Settings::new(LeaseSettings {
        name: "podid-controller".into(),
        namespace: "podid-system".into(),
        holder: format!("{}-controller", node.name),
        timings: LeaseTimings::default(),
    });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(Controller::new(node.client(), settings).run(shutdown.clone()));
    (shutdown, task)
}

/// The pod's namespace and name from its CNI_ARGS.
fn pod_name(pod: &Pod) -> Result<(String, String)> {
    let arg = |key: &str| {
        pod.attachment
            .args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .with_context(|| format!("the attachment has no {key}"))
    };
    Ok((arg("K8S_POD_NAMESPACE")?, arg("K8S_POD_NAME")?))
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_controller();
    }
}
