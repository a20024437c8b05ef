"""Fine-tuning as a service: the jobs tenants create through the gateway's API, run outside the gateway.

    worker.py     ``lorafleet worker``: claims jobs from the state database, validates their files, runs each
                  on an executor, renews its lease, stops it on cancel or pause (torch-free)
    executors.py  where a job's training runs: ``local`` (a child process at low priority) or ``ray`` (an
                  existing Ray cluster, through Ray's Job Submission SDK)
    runner.py     the training itself, one process per job wherever the executor puts it: TRL through
                  ``training.train``, events and checkpoints into the database, the adapter published and
                  granted when it succeeds
    recipes.py    the base models' recipes: what ``"auto"`` hyperparameters become
    validate.py   the ``validating_files`` step: the data check of ``contract.examples``

The gateway (``serving``) imports nothing from here: it writes jobs into the
state database (``serving.state.jobs``) and serves what they publish.
"""
