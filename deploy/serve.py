"""Serve the bard deployments against the Prefect server named by PREFECT_API_URL (what `bard ui` runs).

    PREFECT_API_URL=http://HOST:4200/api python deploy/serve.py --config '{"name": "tiny"}'

The config is a `flows.deployments.ServeConfig` as JSON: deployment name, the pipeline's parameters, its cron
schedule and the data sensor's interval.
"""

import sys

from flows.deployments import main

if __name__ == "__main__":
    sys.exit(main())
