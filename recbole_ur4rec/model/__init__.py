"""The plugin's models. Every recommender class imported here is found by ``get_model`` by its name."""
from recbole_ur4rec.model.duorec import DuoRec
from recbole_ur4rec.model.fastsasrec import FastSASRec
from recbole_ur4rec.model.feddmmr import FedDMMR
from recbole_ur4rec.model.ftragrec import FTRagRec
from recbole_ur4rec.model.ur4rec import UR4Rec
