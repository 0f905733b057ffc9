"""The plugin's models. Every recommender class imported here is found by ``get_model`` by its name."""
from recbole_ur4rec.model.fastsasrec import FastSASRec
