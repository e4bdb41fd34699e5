"""Federation: many data owners train one adapter through Flower (`offsite federate`, `offsite.federation.app`).

`updates` (what travels, and its checks), `client` (a data owner's round), `server` (the model
owner's strategy, checks and round log), `secure` (SecAgg+), `simulation` (one machine) and `app`
(the Flower App the deployment runtime runs).
"""

import os

# Flower reports usage to its developers unless told not to; nothing of a federation leaves the machines
# it runs on. Read when flwr is first imported, which every module here does after this.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
