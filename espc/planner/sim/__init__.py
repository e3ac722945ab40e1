"""The simulation world: workloads, cost model + calibration, ClusterState, the simulator,
baseline strategies and metrics. Imports nothing from `espc.planner.compile`."""
