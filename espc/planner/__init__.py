"""Planner: the IterationPlan IR (`plan`) and two worlds built on it.

- `espc.planner.sim`: the simulation world — workloads and traces, the cost model and its
  calibration, cluster state, the discrete-event simulator, the baseline strategies and
  metrics. It never imports the compile world.
- `espc.planner.compile`: policy compilation — the Policy IR, the policy MILP, the batching
  DP, the elastic scheduler, strategy evaluation (goodput search over simulations), the
  compile pipeline, artifacts and reports. It builds on the simulation world.

The planner never imports torch.
"""
