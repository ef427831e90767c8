"""``edsam-eval`` (``python -m consumers.evaluate``): zero-shot and linear-probe accuracy of
a trained CLIP, or of any open_clip model, on the built-in domains, ImageFolder trees and
labelled webdatasets, and image-text retrieval on captioned sets.

    edsam-eval checkpoint=runs/<time>                        # a run folder: its newest checkpoint and model
    edsam-eval checkpoint=runs/<time>/checkpoints/step_00000600.pt model=tiny_rn
    edsam-eval model.name=ViT-B-32 model.pretrained=openai eval.templates=openai eval.resolution=224
    edsam-eval checkpoint=runs/<time> +eval.imagefolders.pacs_sketch=/data/pacs/sketch eval.domains=[flat]
    edsam-eval model.name=ViT-B-32 model.pretrained=openai eval.domains=[] eval.resolution=224 \
        eval.templates=openai +eval.imagefolders.imagenet_r=/data/imagenet-r      # wnid folders: ImageNet names
    edsam-eval checkpoint=runs/<time> +eval.webdatasets.test='/data/t/{0000..0009}.tar' \
        +eval.classnames.test=names.txt eval.probe_train='/data/tr/{0000..0099}.tar' +eval.classnames.probe_train=names.txt
    edsam-eval checkpoint=runs/<time> eval.domains=[] +eval.imagefolders.pacs_photo=/data/pacs/photo \
        +eval.imagefolders.pacs_sketch=/data/pacs/sketch eval.probe_train=pacs_photo     # probe fit on a named split
    edsam-eval checkpoint=runs/<time> +eval.retrieval.coco=/data/coco_val.csv eval.retrieval_max_images=5000

``model=tiny|tiny_rn|rn50|vit_b16`` picks an architecture from ``configs/model`` (the only
config group edsam-eval has). A run folder's model is the one its ``hydra/config.yaml``
names; a bare checkpoint file needs ``model.*`` to describe it. Checkpoints load with
``weights_only=True``. Every path ``eval.*`` names is checked before a model is built (a
missing one exits with ``config error: eval.<key>: ...``).

Prints a markdown table (images, zero-shot top-1 and top-5, linear probe top-1, per set and
the means over the built-in target domains; a retrieval table; what the linear probe was fit
on and why a set lacks a number) and writes to ``out_dir`` (default: ``<run folder>/eval``,
or ``eval-<model name>`` without one):

* ``metrics.json``, ``metrics.csv`` (columns metric,set,value): every metric, image counts
  (``eval/count/<set>``) included;
* ``per_class.csv``: one row per set and class: set, class, images, zeroshot_top1,
  linear_probe_top1 (accuracy in [0, 1]; empty where the class has no images or the set no
  probe number);
* ``confusion_<set>.csv``: the zero-shot confusion matrix of each set, one row per true
  class, one column per predicted class (the header row names them), image counts;
* ``info.json``: the model evaluated, what the linear probe was fit on, and the notes.
"""

from __future__ import annotations

from edsam_online.cli import prepare_argv

USAGE = """Zero-shot, linear-probe and retrieval evaluation of a run folder, a checkpoint or an open_clip model.
  edsam-eval checkpoint=runs/<time> +eval.imagefolders.val=/data/val
The output files and more examples: consumers/evaluate.py's docstring, docs/recipes.md ("Evaluation")."""


def main() -> None:
    prepare_argv("edsam-eval", USAGE, root=("consumers.evaluation", "EvaluateConfig"), groups=("model",))
    from consumers.evaluation import run

    run()


if __name__ == "__main__":
    main()
