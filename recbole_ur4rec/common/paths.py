"""Folders the plugin reads its settings and RecBole's example datasets from."""
import os

import recbole

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # recbole_ur4rec/
PLUGIN_PROPERTIES = os.path.join(PACKAGE_DIR, "properties")
RECBOLE_PROPERTIES = os.path.join(os.path.dirname(os.path.abspath(recbole.__file__)), "properties")
RECBOLE_EXAMPLE_DATA = os.path.join(os.path.dirname(os.path.abspath(recbole.__file__)), "dataset_example")
