"""Names that files and code share, in one place (cf. scvi-tools' REGISTRY_KEYS).

Anything read from or written to an .h5ad or a model file is named here, never as a string
literal elsewhere, so the data contract (docs/data_format.md) lives in one file.
"""

UNS = "advcli"  # uns['advcli'] holds everything advcli writes into uns

# Written by `simulate confounder`
TREATMENT = "D"
COVARIATE_PREFIX = "cov_"
Z_TRUE = "Z_true"
LOGIT_D_TRUE = "logit_D_true"
LOG_MU_TRUE = "log_mu_true"
ALPHA_TRUE = "alpha_true"
SIMULATION = "simulation"
COVARIATE_KEYS = "covariate_keys"

# Written by `simulate integrate`
BATCH = "batch"
CELL_TYPE = "cell_type"

# Written by `predict`, confounder mode
Z_HAT = "Z_hat"
Z_PROB = "Z_prob"
D_LOGIT = "D_logit"
D_PROB = "D_prob"
NB_MEAN = "nb_mean"
LOG_LIK_Y = "log_lik_Y"

# Written by `predict`, integrate mode
X_LATENT = "X_advcli"  # integrate and aae: the embedding
X_LATENT_S = "X_advcli_s"  # disentangle: the label-carrying part
X_LATENT_Z = "X_advcli_z"  # disentangle: the part cleaned of the label
DISENTANGLE_INPUTS = "disentangle_inputs"  # uns['advcli'][...]: the label key
AAE_INPUTS = "aae_inputs"  # uns['advcli'][...]: the condition and attribute keys
DOMAIN_PROB = "domain_prob"

PREDICT = "predict"
CONFOUNDER_INPUTS = "confounder_inputs"  # uns['advcli'][...]: what diagnose needs to refit GLMs
INTEGRATE_INPUTS = "integrate_inputs"  # uns['advcli'][...]: the model's batch key and domains
DECODED_AS = "decoded_as_"  # layers['decoded_as_<domain>'] from predict --decode-as

MODES = ("confounder", "integrate", "aae", "disentangle")

# Model file
FORMAT_VERSION = 2  # 2: per-epoch history records and a resumable training state
MODEL_KEYS = ("format", "format_version", "version", "mode", "config", "genes", "encoding",
              "state", "history")
MODEL_FORMAT = "advcli-model"
