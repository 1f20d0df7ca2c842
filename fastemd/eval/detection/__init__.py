"""`fastemd eval detect`'s parts, each readable alone (the command itself: fastemd/eval/detect.py).

- `schedules.py`: the fine-tune schedules (COCO's 1x, the demo's tiny) and their lr;
- `data.py`: a labelled COCO json checked and loaded (boxes, and instance masks for Mask R-CNN),
  its images as a dataset, the batches of each iteration (a function of seed and iteration: a
  resumed run reads what an uninterrupted one would);
- `model.py`: the detectors (torchvision's Faster R-CNN, Mask R-CNN and RetinaNet FPN v2 designs
  on fastemd's ResNet, `DETECTORS`), their parameter groups, precise BN;
- `finetune.py`: the fine-tune loop, its checkpoints, metrics and display;
- `scoring.py`: predictions on the val set and COCOeval's box and mask AP.
"""


class DetectError(ValueError):
    """Bad input for the fine-tune (no annotations, categories that differ, a foreign file): one line."""
