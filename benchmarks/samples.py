"""Inputs the benchmarks and tests share; a library, never run on its own.

- ``photo``: photo-like JPEGs (gradients, shapes, sensor-like noise; quality 90), which decode
  and resize like a catalog's photos where the synthetic catalog's flat shapes would not;
- ``catalog_pairs``: the CPU benchmark's catalog, decoded and resized as the decode stage does;
- ``TITLES``, ``CODES``, ``labelled``: a labelled set of catalog texts for choosing and testing the
  language detector. Product titles as shops write them (brands, sizes and units included) in 14
  languages, and short product codes that no detector can place: those must come back
  undetermined (None).

``photo`` came from the JPEG draft benchmark and ``catalog_pairs`` from the fp32 attention one, both
retired (BENCHMARKS.md, History).
"""

from __future__ import annotations

import io
from pathlib import Path


def photo(width: int, height: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.randint(0, width), rng.randint(0, height)
        r = rng.randint(min(width, height) // 20, min(width, height) // 4)
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(c) for c in rng.randint(0, 256, 3)))
    noisy = np.asarray(image).astype(np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def catalog_pairs(workdir: Path, rows: int, resize):
    """Decoded uint8 images and titles of the CPU benchmark's catalog, as the decode stage makes them."""
    import numpy as np
    import pyarrow.parquet as pq

    from benchmarks.cpu_bench import write_catalog
    from blip_ops.images import decode_rgb

    table = pq.read_table(write_catalog(workdir / "catalog", rows, rows_per_group=rows, distinct=True))
    images = np.stack([resize.resize(decode_rgb(b)) for b in table.column("image").to_pylist()])
    return images, table.column("text").to_pylist()


TITLES = {
    "en": [
        "Men's waterproof hiking boots, brown leather",
        "Stainless steel chef's knife with wooden handle",
        "Wireless noise cancelling headphones with microphone",
        "Red leather sofa for the living room",
        "Organic green tea, pack of 20 bags",
        "Kids' bicycle with training wheels and a bell",
    ],
    "de": [
        "Wasserdichte Wanderschuhe für Herren aus braunem Leder",
        "Kochmesser aus Edelstahl mit Holzgriff",
        "Kabellose Kopfhörer mit Geräuschunterdrückung",
        "Rotes Ledersofa für das Wohnzimmer",
        "Bio Grüner Tee, Packung mit 20 Beuteln",
        "Kinderfahrrad mit Stützrädern und Klingel",
    ],
    "fr": [
        "Chaussures de randonnée imperméables pour homme en cuir marron",
        "Couteau de chef en acier inoxydable avec manche en bois",
        "Casque sans fil à réduction de bruit avec micro",
        "Canapé en cuir rouge pour le salon",
        "Thé vert bio, boîte de 20 sachets",
        "Vélo pour enfant avec petites roues et sonnette",
    ],
    "es": [
        "Botas de montaña impermeables para hombre de piel marrón",
        "Cuchillo de cocinero de acero inoxidable con mango de madera",
        "Auriculares inalámbricos con cancelación de ruido",
        "Sofá de cuero rojo para el salón",
        "Té verde ecológico, caja de 20 bolsitas",
        "Bicicleta infantil con ruedas de apoyo y timbre",
    ],
    "it": [
        "Scarponi da trekking impermeabili da uomo in pelle marrone",
        "Coltello da cuoco in acciaio inox con manico in legno",
        "Cuffie senza fili con cancellazione del rumore",
        "Divano in pelle rossa per il soggiorno",
        "Tè verde biologico, confezione da 20 bustine",
        "Bicicletta per bambini con rotelle e campanello",
    ],
    "pt": [
        "Botas de caminhada impermeáveis masculinas em couro marrom",
        "Faca de chef em aço inoxidável com cabo de madeira",
        "Fones de ouvido sem fio com cancelamento de ruído",
        "Sofá de couro vermelho para a sala de estar",
        "Chá verde orgânico, caixa com 20 saquinhos",
        "Bicicleta infantil com rodinhas e campainha",
    ],
    "nl": [
        "Waterdichte wandelschoenen voor heren van bruin leer",
        "Koksmes van roestvrij staal met houten handvat",
        "Draadloze koptelefoon met ruisonderdrukking",
        "Rode leren bank voor de woonkamer",
        "Biologische groene thee, doos met 20 zakjes",
        "Kinderfiets met zijwieltjes en een bel",
    ],
    "pl": [
        "Wodoodporne buty trekkingowe męskie z brązowej skóry",
        "Nóż szefa kuchni ze stali nierdzewnej z drewnianą rękojeścią",
        "Bezprzewodowe słuchawki z redukcją szumów",
        "Czerwona skórzana sofa do salonu",
        "Ekologiczna zielona herbata, opakowanie 20 torebek",
        "Rower dziecięcy z kółkami bocznymi i dzwonkiem",
    ],
    "sv": [
        "Vattentäta vandringskängor för herr i brunt läder",
        "Kockkniv i rostfritt stål med träskaft",
        "Trådlösa hörlurar med brusreducering",
        "Röd lädersoffa till vardagsrummet",
        "Ekologiskt grönt te, förpackning med 20 påsar",
        "Barncykel med stödhjul och ringklocka",
    ],
    "tr": [
        "Erkek su geçirmez kahverengi deri yürüyüş botu",
        "Ahşap saplı paslanmaz çelik şef bıçağı",
        "Gürültü önleyici kablosuz kulaklık",
        "Oturma odası için kırmızı deri kanepe",
        "Organik yeşil çay, 20 poşetlik paket",
        "Yardımcı tekerlekli ve zilli çocuk bisikleti",
    ],
    "ru": [
        "Мужские водонепроницаемые ботинки из коричневой кожи",
        "Нож шеф-повара из нержавеющей стали с деревянной ручкой",
        "Беспроводные наушники с шумоподавлением",
        "Красный кожаный диван для гостиной",
        "Органический зелёный чай, 20 пакетиков",
        "Детский велосипед с дополнительными колёсами и звонком",
    ],
    "ar": [
        "حذاء رجالي مقاوم للماء من الجلد البني",
        "سكين طاهٍ من الفولاذ المقاوم للصدأ بمقبض خشبي",
        "سماعات لاسلكية مع خاصية إلغاء الضوضاء",
        "أريكة جلدية حمراء لغرفة المعيشة",
        "شاي أخضر عضوي، علبة من 20 كيسًا",
        "دراجة أطفال بعجلات مساعدة وجرس",
    ],
    "zh": [
        "男士防水棕色真皮登山靴",
        "不锈钢厨师刀木柄",
        "无线降噪耳机带麦克风",
        "客厅红色真皮沙发",
        "有机绿茶20袋装",
        "带辅助轮和车铃的儿童自行车",
    ],
    "ja": [
        "メンズ防水ハイキングブーツ 茶色の本革",
        "木製ハンドルのステンレス製牛刀",
        "マイク付きワイヤレスノイズキャンセリングヘッドホン",
        "リビング用の赤い革のソファ",
        "有機緑茶 ティーバッグ20袋入り",
        "補助輪とベル付きの子供用自転車",
    ],
}

# Codes, sizes and model numbers: no language to tell; flagging them would be noise.
CODES = [
    "iPhone 15 Pro 256GB",
    "SKU-4432-XL",
    "RTX 4090 24GB",
    "A4 80g/m2",
    "USB-C 2m",
    "XL",
    "Galaxy S24 Ultra",
    "MX-500 / 2x AA",
    "1080p HDMI 2.1",
    "B07XJ8C8F5",
    "Nike Air Max 90",
    "PS5",
]


def labelled() -> list[tuple[str, str | None]]:
    """(text, expected ISO 639-1 code or None) pairs."""
    return [(text, code) for code, texts in TITLES.items() for text in texts] + [(code, None) for code in CODES]
