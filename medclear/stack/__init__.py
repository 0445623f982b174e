"""The local stack behind `medclear up / status / restart / down` (the processes
are listed in medclear/stack/supervisor.py).

- `process`: free ports on loopback; a started process that is signalled only while /proc
  still shows the very process that was started.
- `probes`: waiting until a server is ready.
- `kafka`: Apache Kafka's KRaft nodes; `acls`: who may do what on it.
- `servers`: ClickHouse and Prometheus, medclear's topics; `smsc`: the loopback SMPP peer.
- `supervisor`: `up`, `status`, `restart_component`, `down`, and the record of what runs
  (``<state_dir>/stack.json``, read by clients through medclear.infra.stack_state).

The names below are the package's API; the integration-test fixtures use the same building
blocks to start single servers.
"""

from medclear.infra.stack_state import STATE_FILE as STATE_FILE
from medclear.infra.stack_state import Endpoints as Endpoints
from medclear.infra.stack_state import StackError as StackError
from medclear.infra.stack_state import client_pki_dir as client_pki_dir
from medclear.infra.stack_state import load_endpoints as load_endpoints
from medclear.stack.probes import READY_LINE as READY_LINE
from medclear.stack.probes import http_get as http_get
from medclear.stack.probes import wait_http_ok as wait_http_ok
from medclear.stack.probes import wait_kafka_ready as wait_kafka_ready
from medclear.stack.process import Process as Process
from medclear.stack.process import can_bind as can_bind
from medclear.stack.process import free_port as free_port
from medclear.stack.process import proc_cmdline as proc_cmdline
from medclear.stack.process import proc_start_ticks as proc_start_ticks
from medclear.stack.process import reap as reap
from medclear.stack.record import ComponentStatus as ComponentStatus
from medclear.stack.servers import create_topics as create_topics
from medclear.stack.servers import start_clickhouse as start_clickhouse
from medclear.stack.servers import start_prometheus as start_prometheus
from medclear.stack.supervisor import down as down
from medclear.stack.supervisor import restart_component as restart_component
from medclear.stack.supervisor import selected_jobs as selected_jobs
from medclear.stack.supervisor import status as status
from medclear.stack.supervisor import status_table as status_table
from medclear.stack.supervisor import up as up
