-- 020_seed.sql — deterministic, idempotent reference data for orders_pipeline.
--
-- * No random(): every value is computed from generate_series indexes and the literal
--   arrays below, so every run on every server produces exactly the same rows.
-- * Idempotent: INSERT ... ON CONFLICT DO NOTHING; a second run inserts nothing and
--   changes nothing.
-- * Plain SQL statements only (no psql meta-commands, no COPY, no dollar quoting), so it
--   runs both with `psql -v ON_ERROR_STOP=1 -f` and with psycopg's cursor.execute(text).
--
-- Requires the tables products, currencies and zip_codes (created by an earlier file).

------------------------------------------------------------------------------------------
-- Products: 12 categories x 120 products = 1,440 rows, product_id P000001 .. P001440.
-- Product i (1-based) belongs to category (i - 1) % 12; within its category it is the
-- k-th product, k = (i - 1) / 12 in 0..119, named adjectives[k % 12 + 1] || ' ' ||
-- nouns[k / 12 + 1] (12 adjectives x 10 nouns = 120 distinct names per category).
-- base_price = floor(min + (max - min) * f^2) + 0.99 with f in [0, 1] derived from k and
-- the category (exact numeric arithmetic, skewed towards cheaper items); always > 0.
------------------------------------------------------------------------------------------
WITH category(cat_no, category, price_min, price_max, adjectives, nouns) AS (
    VALUES
    (0, 'Electronics', 19, 899,
        ARRAY['Wireless', 'Bluetooth', 'Smart', 'Portable', 'Noise-Cancelling', 'Rechargeable',
              'Compact', 'USB-C', 'Waterproof', 'Ultra-Slim', 'Pro', 'High-Fidelity'],
        ARRAY['Headphones', 'Earbuds', 'Speaker', 'Monitor', 'Keyboard', 'Mouse', 'Webcam',
              'Power Bank', 'Charger', 'Smartwatch']),
    (1, 'Home & Kitchen', 9, 349,
        ARRAY['Stainless Steel', 'Non-Stick', 'Ceramic', 'Cast Iron', 'Bamboo', 'Glass',
              'Programmable', 'Insulated', 'Collapsible', 'Premium', 'Heavy-Duty', 'Space-Saving'],
        ARRAY['Frying Pan', 'Cookware Set', 'Knife Set', 'Cutting Board', 'Coffee Maker',
              'Blender', 'Food Storage Containers', 'Mixing Bowls', 'Kettle', 'Dish Rack']),
    (2, 'Books', 6, 59,
        ARRAY['Paperback', 'Hardcover', 'Illustrated', 'Bestselling', 'Annotated',
              'Collector''s Edition', 'Large Print', 'Award-Winning', 'Classic', 'Pocket',
              'Complete', 'Signed'],
        ARRAY['Mystery Novel', 'Cookbook', 'Science Fiction Novel', 'Biography', 'Travel Guide',
              'World History', 'Poetry Collection', 'Picture Book', 'Self-Help Guide',
              'Programming Handbook']),
    (3, 'Clothing', 9, 149,
        ARRAY['Slim-Fit', 'Organic Cotton', 'Classic', 'Lightweight', 'Waterproof', 'Merino Wool',
              'Relaxed-Fit', 'Quilted', 'Vintage', 'Stretch', 'Linen', 'Fleece-Lined'],
        ARRAY['T-Shirt', 'Jeans', 'Hoodie', 'Rain Jacket', 'Chinos', 'Sweater', 'Dress Shirt',
              'Joggers', 'Vest', 'Shorts']),
    (4, 'Sports & Outdoors', 12, 499,
        ARRAY['Ultralight', 'Adjustable', 'Waterproof', 'Foldable', 'Insulated', 'Heavy-Duty',
              'Breathable', 'Carbon Fiber', 'All-Weather', 'Compact', 'Professional', 'Ergonomic'],
        ARRAY['Tent', 'Sleeping Bag', 'Hiking Backpack', 'Yoga Mat', 'Dumbbell Set',
              'Trekking Poles', 'Water Bottle', 'Camping Stove', 'Resistance Bands', 'Bike Helmet']),
    (5, 'Toys & Games', 7, 129,
        ARRAY['Wooden', 'Magnetic', 'Interactive', 'Educational', 'Deluxe', 'Glow-in-the-Dark',
              'Classic', 'Musical', 'Stackable', 'Family', 'Mini', 'Rainbow'],
        ARRAY['Building Blocks', 'Puzzle', 'Board Game', 'Race Car', 'Dollhouse', 'Train Set',
              'Card Game', 'Robot Kit', 'Teddy Bear', 'Art Set']),
    (6, 'Beauty', 4, 89,
        ARRAY['Hydrating', 'Organic', 'Vitamin C', 'Fragrance-Free', 'Mineral', 'Nourishing',
              'Travel-Size', 'Anti-Aging', 'Soothing', 'Vegan', 'Gentle', 'Brightening'],
        ARRAY['Face Serum', 'Moisturizer', 'Lip Balm', 'Shampoo', 'Conditioner', 'Sunscreen SPF 50',
              'Cleanser', 'Eye Cream', 'Body Lotion', 'Face Mask']),
    (7, 'Grocery', 1, 39,
        ARRAY['Organic', 'Gluten-Free', 'Non-GMO', 'Premium', 'Family-Size', 'Low-Sodium',
              'Fair Trade', 'Artisan', 'Imported', 'Lightly Salted', 'Natural', 'Value Pack'],
        ARRAY['Almonds', 'Olive Oil', 'Rolled Oats', 'Coffee Beans', 'Green Tea', 'Pasta',
              'Peanut Butter', 'Granola', 'Basmati Rice', 'Dark Chocolate']),
    (8, 'Automotive', 8, 399,
        ARRAY['All-Season', 'Heavy-Duty', 'Universal', 'Premium', 'Portable', 'Waterproof',
              'Magnetic', 'Digital', 'Quick-Release', 'High-Performance', 'Custom-Fit', 'Pro-Grade'],
        ARRAY['Wiper Blades', 'Floor Mats', 'Jump Starter', 'Tire Inflator', 'Seat Covers',
              'Motor Oil 5W-30', 'Dash Cam', 'Phone Mount', 'Car Wax', 'Headlight Bulbs']),
    (9, 'Garden', 5, 299,
        ARRAY['Expandable', 'Solar-Powered', 'Galvanized', 'Ergonomic', 'Raised', 'Self-Watering',
              'Heavy-Duty', 'Cordless', 'Weatherproof', 'Organic', 'Decorative', 'Adjustable'],
        ARRAY['Garden Hose', 'Pruning Shears', 'Planter', 'Hedge Trimmer', 'Bird Feeder',
              'Compost Bin', 'Sprinkler', 'Garden Lights', 'Potting Soil', 'Wheelbarrow']),
    (10, 'Office Supplies', 1, 249,
        ARRAY['Ergonomic', 'Recycled', 'Refillable', 'Heavy-Duty', 'Adjustable', 'Wireless',
              'Magnetic', 'Premium', 'Stackable', 'Color-Coded', 'Compact', 'Executive'],
        ARRAY['Desk Chair', 'Notebook', 'Ballpoint Pens', 'Stapler', 'File Organizer', 'Desk Lamp',
              'Sticky Notes', 'Whiteboard', 'Paper Shredder', 'Label Maker']),
    (11, 'Pet Supplies', 3, 149,
        ARRAY['Orthopedic', 'Grain-Free', 'Interactive', 'Reflective', 'Chew-Resistant',
              'Self-Cleaning', 'Waterproof', 'Calming', 'Elevated', 'Adjustable', 'Natural',
              'Automatic'],
        ARRAY['Dog Bed', 'Cat Tree', 'Dog Leash', 'Cat Litter Box', 'Pet Fountain', 'Dog Harness',
              'Dog Treats', 'Cat Scratcher', 'Pet Carrier', 'Chew Toy'])
),
idx AS (
    SELECT i, (i - 1) % 12 AS cat_no, (i - 1) / 12 AS k
    FROM generate_series(1, 1440) AS g(i)
)
INSERT INTO products (product_id, name, category, base_price)
SELECT 'P' || lpad(idx.i::text, 6, '0'),
       c.adjectives[idx.k % 12 + 1] || ' ' || c.nouns[idx.k / 12 + 1],
       c.category,
       (floor(c.price_min + (c.price_max - c.price_min)
              * power(((idx.k * 37 + c.cat_no * 11) % 100)::numeric / 99, 2)) + 0.99)::numeric(12, 2)
FROM idx
JOIN category AS c USING (cat_no)
ORDER BY idx.i
ON CONFLICT (product_id) DO NOTHING;

------------------------------------------------------------------------------------------
-- Currencies: ISO 4217 codes; rate_to_usd = USD value of ONE unit of the currency
-- (plausible 2025 mid-market rates, fixed so that runs are reproducible).
------------------------------------------------------------------------------------------
INSERT INTO currencies (currency_code, name, rate_to_usd) VALUES
    ('USD', 'US Dollar',            1.00000000),
    ('EUR', 'Euro',                 1.08000000),
    ('GBP', 'Pound Sterling',       1.27000000),
    ('JPY', 'Japanese Yen',         0.00670000),
    ('CAD', 'Canadian Dollar',      0.72000000),
    ('AUD', 'Australian Dollar',    0.65000000),
    ('CHF', 'Swiss Franc',          1.13000000),
    ('CNY', 'Chinese Yuan Renminbi', 0.13800000),
    ('INR', 'Indian Rupee',         0.01170000),
    ('MXN', 'Mexican Peso',         0.05300000),
    ('BRL', 'Brazilian Real',       0.18000000),
    ('SEK', 'Swedish Krona',        0.09500000),
    ('NOK', 'Norwegian Krone',      0.09200000),
    ('DKK', 'Danish Krone',         0.14500000),
    ('PLN', 'Polish Zloty',         0.25500000),
    ('KRW', 'South Korean Won',     0.00072000),
    ('SGD', 'Singapore Dollar',     0.75000000),
    ('HKD', 'Hong Kong Dollar',     0.12800000),
    ('NZD', 'New Zealand Dollar',   0.59000000),
    ('ZAR', 'South African Rand',   0.05500000),
    ('TRY', 'Turkish Lira',         0.02600000),
    ('CZK', 'Czech Koruna',         0.04400000),
    ('HUF', 'Hungarian Forint',     0.00275000),
    ('ILS', 'Israeli New Shekel',   0.28000000),
    ('THB', 'Thai Baht',            0.02950000),
    ('AED', 'UAE Dirham',           0.27229408),
    ('SAR', 'Saudi Riyal',          0.26666667),
    ('PHP', 'Philippine Peso',      0.01750000),
    ('IDR', 'Indonesian Rupiah',    0.00006150),
    ('MYR', 'Malaysian Ringgit',    0.22800000),
    ('TWD', 'New Taiwan Dollar',    0.03200000),
    ('CLP', 'Chilean Peso',         0.00105000),
    ('COP', 'Colombian Peso',       0.00024500),
    ('RON', 'Romanian Leu',         0.21700000),
    ('ISK', 'Icelandic Krona',      0.00780000),
    ('PEN', 'Peruvian Sol',         0.27500000),
    ('EGP', 'Egyptian Pound',       0.02000000),
    ('VND', 'Vietnamese Dong',      0.00003900)
ON CONFLICT (currency_code) DO NOTHING;

------------------------------------------------------------------------------------------
-- Zip codes: 32 per state for the 50 states + DC = 1,632 rows.
-- Each state owns a contiguous block of real 3-digit ZIP prefixes (prefix_lo..prefix_hi,
-- blocks do not overlap), i.e. n = (prefix_hi - prefix_lo + 1) * 99 candidate codes
-- ppp01..ppp99. The j-th zip of a state (j = 0..31) is candidate m = (j * 7919) % n:
-- 7919 is prime and larger than any n, so j -> m is a bijection and codes are unique.
-- zip = (prefix_lo + m / 99) * 100 + m % 99 + 1. The city is one of the state's real
-- cities, chosen by the 3-digit prefix. region = US Census region. shipping_zone 1..8
-- grows with the great-circle distance of the state's centroid from the geographic
-- center of the contiguous US (near Lebanon, KS): 1 + floor(km / 350), capped at 7 for
-- the contiguous states; Alaska and Hawaii are zone 8.
------------------------------------------------------------------------------------------
WITH state(state, region, shipping_zone, prefix_lo, prefix_hi, cities) AS (
    VALUES
    ('AL', 'South',     4, 350, 369, ARRAY['Birmingham', 'Montgomery', 'Huntsville', 'Mobile']),
    ('AK', 'West',      8, 995, 999, ARRAY['Anchorage', 'Fairbanks', 'Juneau']),
    ('AZ', 'West',      4, 850, 865, ARRAY['Phoenix', 'Tucson', 'Mesa', 'Flagstaff']),
    ('AR', 'South',     3, 716, 729, ARRAY['Little Rock', 'Fayetteville', 'Fort Smith', 'Jonesboro']),
    ('CA', 'West',      6, 900, 961, ARRAY['Los Angeles', 'San Diego', 'San Jose', 'San Francisco', 'Sacramento', 'Fresno']),
    ('CO', 'West',      2, 800, 816, ARRAY['Denver', 'Colorado Springs', 'Aurora', 'Boulder']),
    ('CT', 'Northeast', 7, 60,  69,  ARRAY['Hartford', 'New Haven', 'Bridgeport', 'Stamford']),
    ('DE', 'South',     6, 197, 199, ARRAY['Wilmington', 'Dover', 'Newark']),
    ('DC', 'South',     6, 200, 205, ARRAY['Washington']),
    ('FL', 'South',     6, 320, 339, ARRAY['Miami', 'Orlando', 'Tampa', 'Jacksonville']),
    ('GA', 'South',     5, 300, 319, ARRAY['Atlanta', 'Savannah', 'Augusta', 'Athens']),
    ('HI', 'West',      8, 967, 968, ARRAY['Honolulu', 'Hilo', 'Kailua']),
    ('ID', 'West',      5, 832, 838, ARRAY['Boise', 'Idaho Falls', 'Pocatello', 'Meridian']),
    ('IL', 'Midwest',   3, 600, 629, ARRAY['Chicago', 'Springfield', 'Peoria', 'Naperville']),
    ('IN', 'Midwest',   3, 460, 479, ARRAY['Indianapolis', 'Fort Wayne', 'Evansville', 'South Bend']),
    ('IA', 'Midwest',   2, 500, 528, ARRAY['Des Moines', 'Cedar Rapids', 'Davenport', 'Iowa City']),
    ('KS', 'Midwest',   1, 660, 679, ARRAY['Wichita', 'Topeka', 'Overland Park', 'Lawrence']),
    ('KY', 'South',     4, 400, 427, ARRAY['Louisville', 'Lexington', 'Bowling Green', 'Frankfort']),
    ('LA', 'South',     4, 700, 714, ARRAY['New Orleans', 'Baton Rouge', 'Shreveport', 'Lafayette']),
    ('ME', 'Northeast', 7, 39,  49,  ARRAY['Portland', 'Bangor', 'Augusta', 'Lewiston']),
    ('MD', 'South',     6, 206, 219, ARRAY['Baltimore', 'Annapolis', 'Frederick', 'Rockville']),
    ('MA', 'Northeast', 7, 10,  27,  ARRAY['Boston', 'Worcester', 'Springfield', 'Cambridge']),
    ('MI', 'Midwest',   4, 480, 499, ARRAY['Detroit', 'Grand Rapids', 'Lansing', 'Ann Arbor']),
    ('MN', 'Midwest',   3, 550, 567, ARRAY['Minneapolis', 'Saint Paul', 'Rochester', 'Duluth']),
    ('MS', 'South',     4, 386, 397, ARRAY['Jackson', 'Gulfport', 'Hattiesburg', 'Biloxi']),
    ('MO', 'Midwest',   2, 630, 658, ARRAY['Kansas City', 'St. Louis', 'Springfield', 'Columbia']),
    ('MT', 'West',      4, 590, 599, ARRAY['Billings', 'Missoula', 'Bozeman', 'Helena']),
    ('NE', 'Midwest',   1, 680, 693, ARRAY['Omaha', 'Lincoln', 'Grand Island', 'Kearney']),
    ('NV', 'West',      5, 889, 898, ARRAY['Las Vegas', 'Reno', 'Henderson', 'Carson City']),
    ('NH', 'Northeast', 7, 30,  38,  ARRAY['Manchester', 'Nashua', 'Concord', 'Portsmouth']),
    ('NJ', 'Northeast', 6, 70,  89,  ARRAY['Newark', 'Jersey City', 'Trenton', 'Princeton']),
    ('NM', 'West',      3, 870, 884, ARRAY['Albuquerque', 'Santa Fe', 'Las Cruces', 'Roswell']),
    ('NY', 'Northeast', 6, 100, 149, ARRAY['New York', 'Buffalo', 'Rochester', 'Albany', 'Syracuse']),
    ('NC', 'South',     5, 270, 289, ARRAY['Charlotte', 'Raleigh', 'Greensboro', 'Durham']),
    ('ND', 'Midwest',   3, 580, 588, ARRAY['Fargo', 'Bismarck', 'Grand Forks', 'Minot']),
    ('OH', 'Midwest',   4, 430, 459, ARRAY['Columbus', 'Cleveland', 'Cincinnati', 'Toledo']),
    ('OK', 'South',     2, 730, 749, ARRAY['Oklahoma City', 'Tulsa', 'Norman', 'Edmond']),
    ('OR', 'West',      6, 970, 979, ARRAY['Portland', 'Salem', 'Eugene', 'Bend']),
    ('PA', 'Northeast', 6, 150, 196, ARRAY['Philadelphia', 'Pittsburgh', 'Harrisburg', 'Allentown']),
    ('RI', 'Northeast', 7, 28,  29,  ARRAY['Providence', 'Warwick', 'Cranston', 'Newport']),
    ('SC', 'South',     5, 290, 299, ARRAY['Columbia', 'Charleston', 'Greenville', 'Myrtle Beach']),
    ('SD', 'Midwest',   2, 570, 577, ARRAY['Sioux Falls', 'Rapid City', 'Pierre', 'Aberdeen']),
    ('TN', 'South',     4, 370, 385, ARRAY['Nashville', 'Memphis', 'Knoxville', 'Chattanooga']),
    ('TX', 'South',     3, 750, 799, ARRAY['Houston', 'Dallas', 'Austin', 'San Antonio', 'El Paso']),
    ('UT', 'West',      4, 840, 847, ARRAY['Salt Lake City', 'Provo', 'Ogden', 'St. George']),
    ('VT', 'Northeast', 7, 50,  54,  ARRAY['Burlington', 'Montpelier', 'Rutland', 'Brattleboro']),
    ('VA', 'South',     5, 220, 246, ARRAY['Richmond', 'Virginia Beach', 'Norfolk', 'Roanoke']),
    ('WA', 'West',      6, 980, 994, ARRAY['Seattle', 'Spokane', 'Tacoma', 'Olympia']),
    ('WV', 'South',     5, 247, 268, ARRAY['Charleston', 'Huntington', 'Morgantown', 'Wheeling']),
    ('WI', 'Midwest',   3, 530, 549, ARRAY['Milwaukee', 'Madison', 'Green Bay', 'Eau Claire']),
    ('WY', 'West',      3, 820, 831, ARRAY['Cheyenne', 'Casper', 'Laramie', 'Jackson'])
),
pick AS (
    SELECT s.state, s.region, s.shipping_zone, s.prefix_lo, s.cities,
           (j * 7919) % ((s.prefix_hi - s.prefix_lo + 1) * 99) AS m
    FROM state AS s
    CROSS JOIN generate_series(0, 31) AS g(j)
)
INSERT INTO zip_codes (zip_code, city, state, region, shipping_zone)
SELECT lpad(((prefix_lo + m / 99) * 100 + m % 99 + 1)::text, 5, '0'),
       cities[(m / 99) % cardinality(cities) + 1],
       state,
       region,
       shipping_zone::smallint
FROM pick
ORDER BY 1
ON CONFLICT (zip_code) DO NOTHING;
