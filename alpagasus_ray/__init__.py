"""alpagasus_ray: the AlpaGasus method (rate -> filter -> fine-tune -> evaluate) on Ray.

Importing the package is cheap: Ray, vLLM, torch and DeepSpeed are imported by the stages that
use them.
"""

__version__ = "0.1.0"
