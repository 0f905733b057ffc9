from recbole_ur4rec.data.utils import create_dataset, data_preparation, full_ranking
