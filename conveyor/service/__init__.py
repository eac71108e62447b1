"""The service beside Prefect: `conveyor up`'s supervisor (server, pools, queues, concurrency limits,
deployments, automations), the Prefect server it starts and `conveyor worker`. This package talks to Prefect,
so tests/test_layers.py counts it with `flows/` and `tasks/` (the Prefect layer), above the domain."""
