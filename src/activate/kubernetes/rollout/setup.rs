//! A rollout controller as it starts, before its first look at the cluster.

use super::*;

impl Controller {
    /// The controller of `cfg`'s Deployment, before its first look at the cluster.
    pub(super) fn new(
        client: &Client,
        cfg: &KubernetesBackend,
        rollout: Rollout,
        routing: Arc<Routing>,
        board: Arc<Board>,
    ) -> Controller {
        let gate = routing.gate().clone();
        let ns = cfg.namespace.clone();
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let steps: Arc<[ValidationStep]> = rollout.validation.clone().into();
        Controller {
            steps,
            gate: gate.clone(),
            routing,
            cfg: rollout,
            port: cfg.port.clone(),
            deployment: cfg.workload.name.clone(),
            pods: Api::namespaced(client.clone(), &ns),
            events: Api::namespaced(client.clone(), &ns),
            deployments: deployments.clone(),
            client: validate::step_client(),
            board,
            active: None,
            validating: HashSet::new(),
            done: HashSet::new(),
            rolled_back: HashSet::new(),
            spans: HashMap::new(),
            progress: Arc::default(),
            progressed: Arc::default(),
            versions: BTreeMap::new(),
            last_result: None,
            waiting_for: None,
            warning: None,
            switching: false,
            tasks: JoinSet::new(),
            workload: WorkloadApi::new(client.clone(), &ns, &cfg.workload),
            replicas: cfg.replicas,
            scaling: cfg.scaling,
            woken: HashSet::new(),
            waking_for: None,
        }
    }
}
